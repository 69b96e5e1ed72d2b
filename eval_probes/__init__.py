"""Frozen-feature evaluation probes (linear and weighted k-NN).

The package consumes a frozen ``embed(batch) -> Tensor`` function, never a
training objective, and does not depend on ``pretrain`` or ``launch``.

Typical use::

    from eval_probes import run_probes

    results = run_probes(embed, train_loader, test_loader, epochs=100, k=20)
    results["linear"]["test_acc"], results["knn"]["test_acc"]
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Iterable, Mapping, Sequence

import torch

from data.common import Registry, UnknownNameError

from .features import extract_features
from .knn import knn_predict, knn_probe
from .linear import linear_probe

__all__ = ["extract_features", "linear_probe", "knn_probe", "knn_predict", "run_probes", "PROBES"]

#: Probe name -> function taking ``(train_x, train_y, test_x, test_y, **kw)``; a new probe is
#: ``PROBES.register("name", fn)``.
PROBES: Registry = Registry("probe")
PROBES.register("linear", linear_probe)
PROBES.register("knn", knn_probe)


def _keyword_names(fn: Callable[..., Any]) -> set:
    """Names of the keyword-capable parameters of ``fn``."""
    return {
        name
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def run_probes(
    embed: Callable[[Mapping[str, Any]], torch.Tensor],
    train_loader: Iterable[Mapping[str, Any]],
    test_loader: Iterable[Mapping[str, Any]],
    probes: Sequence[str] = ("linear", "knn"),
    progress: bool = True,
    **kw: Any,
) -> Dict[str, Dict[str, Any]]:
    """Extracts features once and runs the requested probes on them.

    Extra keyword arguments are routed by name: ``max_batches`` goes to
    :func:`extract_features` (for both loaders), and every other name goes to
    each requested probe whose signature accepts it (e.g. ``epochs``,
    ``lrs``, ``seed`` to :func:`linear_probe`; ``k``, ``temperature`` to
    :func:`knn_probe`). ``progress`` also controls the linear probe's bars.

    Args:
        embed: Frozen callable mapping a dict batch to ``[B, D]`` features.
        train_loader: Loader of dict batches (``"image"``, ``"label"``) used
            to fit the probes.
        test_loader: Loader of dict batches used to score them.
        probes: Names of the probes to run, from ``PROBES``.
        progress: Whether to show progress bars.
        **kw: Options routed to :func:`extract_features` and the probes.

    Returns:
        ``{name: result_dict}`` for each requested probe, in request order.

    Raises:
        UnknownNameError: (a ValueError) If a probe name is unknown (the message lists valid ones).
        TypeError: If a keyword argument is accepted by none of the requested
            probes nor by feature extraction.
    """
    if isinstance(probes, str):
        probes = (probes,)
    unknown = [name for name in probes if name not in PROBES]
    if unknown:
        raise UnknownNameError(f"unknown probe(s) {unknown}; valid probes are {sorted(PROBES)}", kind="probe",
                               name=unknown[0], valid=PROBES.names())

    extract_kw = {"max_batches": kw.pop("max_batches")} if "max_batches" in kw else {}
    accepted = {name: _keyword_names(PROBES[name]) for name in probes}
    stray = [key for key in kw if not any(key in names for names in accepted.values())]
    if stray:
        raise TypeError(
            f"run_probes got keyword argument(s) {stray} accepted by none of the probes {list(probes)}"
        )

    train_x, train_y = extract_features(
        embed, train_loader, desc="train features", progress=progress, **extract_kw
    )
    test_x, test_y = extract_features(
        embed, test_loader, desc="test features", progress=progress, **extract_kw
    )

    results: Dict[str, Dict[str, Any]] = {}
    for name in probes:
        probe_kw = {key: value for key, value in kw.items() if key in accepted[name]}
        if "progress" in accepted[name]:
            probe_kw["progress"] = progress
        results[name] = PROBES[name](train_x, train_y, test_x, test_y, **probe_kw)
    return results
