"""A small web server for an INDEX_DIR: a JSON search API and a page with a query box and a grid.

Routes (all GET):

- ``/``: the search page (query box, number of results, re-rank switch, a grid of thumbnails;
  clicking a thumbnail searches for similar images);
- ``/search?q=TEXT&k=K[&rerank=exact]`` or ``/search?id=N&k=K``: JSON
  ``{"query", "k", "rerank", "ms", "results": [{"rank", "id", "score", "label", "path", "thumb"}]}``;
- ``/thumb/ID.png``: a PNG thumbnail of a dataset item (rendered from the dataset for in-memory
  collections such as mnist5k, from the file for image folders);
- ``/files/REL_PATH``: an original image file, only from under the dataset root;
- ``/api/info``: what the index is (kind, size, whether text queries work).

Validation: ``k`` must be an integer in ``[1, max_k]`` (else 400), exactly one of ``q`` / ``id``
(else 400), an unknown id is 404, and a path that resolves outside the dataset root (``..``,
absolute paths, symbolic links leading out) is refused with 403. Errors are JSON ``{"error": ...}``.

Standard library only (:class:`http.server.ThreadingHTTPServer`); bind to localhost unless the
index may be public.
"""
from __future__ import annotations

import io
import json
import os
import threading
import time
from collections import OrderedDict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np

from . import SearchError

__all__ = ["SearchService", "make_server", "serve", "HttpError", "PAGE"]

MAX_QUERY_CHARS = 500
THUMB_SIDE = 112


class HttpError(Exception):
    """An error answer: HTTP status and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _is_under(path: Path, root: Path) -> bool:
    try:
        return os.path.commonpath([str(path), str(root)]) == str(root)
    except ValueError:  # different drives
        return False


class SearchService:
    """The logic behind the routes, independent of HTTP (so it is testable without a socket).

    Args:
        index_dir: an INDEX_DIR written by ``pretrain search build``.
        max_k: the largest ``k`` a client may ask for.
        candidates: candidates handed to a re-ranker (default: the index's default).
    """

    def __init__(self, index_dir: str | os.PathLike, max_k: int = 100, candidates: Optional[int] = None):
        from .index import SearchIndex

        if int(max_k) < 1:
            raise SearchError(f"max_k must be >= 1, got {max_k}")
        self.index = SearchIndex.load(index_dir)
        self.max_k = int(max_k)
        self.candidates = candidates
        try:
            store = self.index.store
            self.items = store.items()
            self.data = dict(store.meta.get("data") or {})
        except SearchError:
            self.items, self.data = {}, {}
        root = self.data.get("root")
        self.root = Path(os.path.realpath(root)) if root else None
        self._ids = set(int(i) for i in self.index.row_ids)
        self._dataset = None
        self._dataset_lock = threading.Lock()
        self._thumbs: "OrderedDict[int, bytes]" = OrderedDict()
        self._thumb_lock = threading.Lock()

    # ------------------------------------------------------------------ info

    @property
    def text_enabled(self) -> bool:
        return self.index.heads is not None

    def info(self) -> dict:
        return {"kind": self.index.kind, "count": len(self.index), "dim": self.index.dim,
                "text": self.text_enabled, "max_k": self.max_k, "data": self.data.get("spec"),
                "split": self.data.get("split")}

    # ------------------------------------------------------------------ search

    def _parse_k(self, params: dict) -> int:
        raw = params.get("k", ["10"])[-1]
        try:
            k = int(raw)
        except ValueError:
            raise HttpError(400, f"k must be an integer between 1 and {self.max_k}, got '{raw[:40]}'") from None
        if not 1 <= k <= self.max_k:
            raise HttpError(400, f"k must be an integer between 1 and {self.max_k}, got {k}")
        return k

    def _parse_id(self, raw: str) -> int:
        try:
            i = int(raw)
        except ValueError:
            raise HttpError(400, f"id must be an integer, got '{raw[:40]}'") from None
        if i not in self._ids:
            raise HttpError(404, f"unknown id {i}: not in this index ({len(self.index)} items)")
        return i

    def search(self, params: dict) -> dict:
        """Answer ``/search`` for parsed query parameters (``parse_qs`` output)."""
        k = self._parse_k(params)
        q = params.get("q", [None])[-1]
        id_raw = params.get("id", [None])[-1]
        rerank = params.get("rerank", [None])[-1] or None
        if (q is None or not q.strip()) == (id_raw is None):
            raise HttpError(400, "give exactly one of q (a text query) or id (an indexed item)")
        if rerank is not None:
            from .rerank import get_reranker

            try:
                get_reranker(rerank)
            except (ValueError, KeyError) as exc:
                raise HttpError(400, str(exc).strip("'\"")) from None
        if id_raw is not None:
            qid = self._parse_id(id_raw)
            vec = self.index.vectors([qid])
            query = {"id": qid}
        else:
            q = q.strip()
            if len(q) > MAX_QUERY_CHARS:
                raise HttpError(400, f"q is {len(q)} characters long; at most {MAX_QUERY_CHARS} are accepted")
            if not self.text_enabled:
                raise HttpError(400, "this index holds unaligned image embeddings: text queries need an index "
                                     "built with 'pretrain search build --heads HEAD_DIR', or embeddings of a "
                                     "CLIP run")
            vec = np.asarray(self.index.heads.text([q]), dtype=np.float32)
            query = {"text": q}
        t0 = time.perf_counter()
        scores, ids = self.index.search(vec, k, rerank=rerank, candidates=self.candidates)
        ms = (time.perf_counter() - t0) * 1000.0
        results = []
        for rank, (s, i) in enumerate(zip(scores[0], ids[0]), 1):
            if i < 0:
                continue
            item = self.items.get(int(i), {})
            results.append({"rank": rank, "id": int(i), "score": round(float(s), 6), "label": item.get("label"),
                            "path": item.get("path"), "thumb": f"/thumb/{int(i)}.png",
                            "file": self._file_url(item.get("path"))})
        return {"query": query, "k": k, "rerank": rerank, "ms": round(ms, 3), "count": len(self.index),
                "results": results}

    # ------------------------------------------------------------------ images

    def _file_url(self, path: Optional[str]) -> Optional[str]:
        if not path or self.root is None:
            return None
        real = Path(os.path.realpath(path))
        if not _is_under(real, self.root):
            return None
        return "/files/" + "/".join(real.relative_to(self.root).parts)

    def _safe_file(self, path: str) -> Path:
        """Resolve ``path`` (relative to the root, or absolute) and refuse anything outside the root."""
        if self.root is None:
            raise HttpError(404, "this collection has no files on disk (an in-memory dataset)")
        if "\x00" in path:
            raise HttpError(400, "the path holds a NUL byte")
        real = Path(os.path.realpath(self.root / path.lstrip("/") if not os.path.isabs(path) else path))
        if not _is_under(real, self.root):
            raise HttpError(403, "only files under the dataset root are served")
        if not real.is_file():
            raise HttpError(404, f"no such file under the dataset root: '{path[:200]}'")
        return real

    def file(self, rel: str) -> tuple[bytes, str]:
        """Bytes and content type of a file under the dataset root (``/files/REL``)."""
        import mimetypes

        real = self._safe_file(rel)
        ctype = mimetypes.guess_type(real.name)[0] or "application/octet-stream"
        if not ctype.startswith("image/"):
            raise HttpError(403, "only image files are served")
        return real.read_bytes(), ctype

    def _dataset_obj(self):
        with self._dataset_lock:
            if self._dataset is None:
                import data as data_lib

                spec, split = self.data.get("spec"), self.data.get("split", "train")
                if not spec:
                    raise HttpError(404, "the index's embeddings record no dataset: no thumbnails")
                self._dataset = data_lib.build_dataset(spec, split, image_size=self.data.get("image_size"))
            return self._dataset

    def thumbnail(self, raw_id: str) -> bytes:
        """PNG thumbnail of dataset item ``raw_id`` (``/thumb/ID.png``)."""
        i = self._parse_id(raw_id[:-4] if raw_id.endswith(".png") else raw_id)
        with self._thumb_lock:
            if i in self._thumbs:
                self._thumbs.move_to_end(i)
                return self._thumbs[i]
        from PIL import Image

        path = self.items.get(i, {}).get("path")
        if path:
            with Image.open(self._safe_file(path)) as im:
                im = im.convert("RGB")
                im.thumbnail((THUMB_SIDE, THUMB_SIDE))
                im.load()
                pic = im.copy()
        else:
            ds = self._dataset_obj()
            if i >= len(ds):
                raise HttpError(404, f"unknown id {i}: the dataset has {len(ds)} items")
            item = ds[i]
            if "skip" in item:
                raise HttpError(404, f"item {i} cannot be read: {item.get('reason', '')}")
            arr = item["image"].numpy().transpose(1, 2, 0)
            pic = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
            scale = max(1, THUMB_SIDE // max(pic.size))
            pic = pic.resize((pic.size[0] * scale, pic.size[1] * scale), Image.NEAREST)
        buf = io.BytesIO()
        pic.save(buf, format="PNG")
        png = buf.getvalue()
        with self._thumb_lock:
            self._thumbs[i] = png
            while len(self._thumbs) > 4096:
                self._thumbs.popitem(last=False)
        return png


class _Handler(BaseHTTPRequestHandler):
    server_version = "pretrain-search/1"
    service: SearchService  # set on the subclass made by make_server
    quiet = True

    def log_message(self, fmt, *args):  # noqa: D401 - access log only when asked for
        if not self.quiet:
            super().log_message(fmt, *args)

    def _send(self, status: int, body: bytes, ctype: str, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def do_HEAD(self):  # noqa: N802
        self.do_GET()

    def do_GET(self):  # noqa: N802
        url = urlsplit(self.path)
        route = url.path
        try:
            if route in ("/", "/index.html"):
                self._send(200, PAGE.encode(), "text/html; charset=utf-8")
            elif route == "/search":
                self._json(200, self.service.search(parse_qs(url.query, keep_blank_values=True)))
            elif route == "/api/info":
                self._json(200, self.service.info())
            elif route.startswith("/thumb/"):
                self._send(200, self.service.thumbnail(unquote(route[len("/thumb/"):])), "image/png", cache=True)
            elif route.startswith("/files/"):
                body, ctype = self.service.file(unquote(route[len("/files/"):]))
                self._send(200, body, ctype, cache=True)
            else:
                raise HttpError(404, f"no route '{route[:100]}'")
        except HttpError as exc:
            self._json(exc.status, {"error": str(exc)})
        except SearchError as exc:
            self._json(400, {"error": str(exc)})
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # a server answers, it does not die
            self._json(500, {"error": f"{type(exc).__name__}: {exc}"})


def make_server(index_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 0, max_k: int = 100,
                candidates: Optional[int] = None, quiet: bool = True) -> ThreadingHTTPServer:
    """A ready (not yet serving) threaded HTTP server for ``index_dir``.

    ``port=0`` picks a free port: read it back from ``server.server_address[1]``. The
    :class:`SearchService` is ``server.service``.
    """
    service = SearchService(index_dir, max_k=max_k, candidates=candidates)
    if service.text_enabled:
        service.index.heads.text_encoder()  # load the text model now, not on the first query
    handler = type("SearchHandler", (_Handler,), {"service": service, "quiet": quiet})
    server = ThreadingHTTPServer((host, int(port)), handler)
    server.daemon_threads = True
    server.service = service
    return server


def serve(index_dir: str | os.PathLike | None = None, host: str = "127.0.0.1", port: int = 8000, max_k: int = 100,
          candidates: Optional[int] = None, quiet: bool = False, server: ThreadingHTTPServer | None = None) -> None:
    """Serve until interrupted (``pretrain search serve``); ``server`` is one from :func:`make_server`."""
    if server is None:
        server = make_server(index_dir, host, port, max_k, candidates, quiet)
    h, p = server.server_address[:2]
    info = server.service.info()
    print(f"serving a '{info['kind']}' index of {info['count']} items "
          f"({'text and image' if info['text'] else 'image-id'} queries) at http://{h}:{p}/  (Ctrl-C stops)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Semantic search</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font-family: system-ui, sans-serif; margin: 1.5rem; background: #fafafa; color: #222; }
 form { display: flex; gap: .5rem; align-items: center; flex-wrap: wrap; }
 #q { flex: 1 1 24rem; font-size: 1.1rem; padding: .4rem .6rem; }
 #grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(120px, 1fr)); gap: .75rem; margin-top: 1rem; }
 figure { margin: 0; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 4px; text-align: center; cursor: pointer; }
 figure img { width: 112px; height: 112px; object-fit: contain; image-rendering: pixelated; background: #000; }
 figcaption { font-size: .75rem; color: #555; }
 #status { margin-top: .75rem; color: #555; min-height: 1.2em; }
 #status.error { color: #b00020; }
</style></head>
<body>
<h1>Semantic search</h1>
<form id="form" novalidate>
 <input id="q" name="q" type="search" placeholder="describe what you look for, e.g. a seven written with very thick strokes" autofocus>
 <label>k <input id="k" name="k" type="number" min="1" value="24" style="width:4.5rem"></label>
 <label><input id="rerank" type="checkbox"> re-rank (exact)</label>
 <button id="go" type="submit">Search</button>
</form>
<div id="status"></div>
<div id="grid"></div>
<script>
const form = document.getElementById('form'), grid = document.getElementById('grid'),
      statusEl = document.getElementById('status');
fetch('/api/info').then(r => r.json()).then(info => {
  document.getElementById('k').max = info.max_k;
  statusEl.textContent = `${info.count} items (${info.data || 'embeddings'}, ${info.kind} index)` +
    (info.text ? '' : ': text queries are off (no alignment heads); click ids to search by image');
}).catch(() => {});
function show(params) {
  statusEl.className = ''; statusEl.textContent = 'searching...';
  if (document.getElementById('rerank').checked) params.set('rerank', 'exact');
  fetch('/search?' + params.toString()).then(r => r.json().then(body => ({ok: r.ok, body})))
  .then(({ok, body}) => {
    grid.replaceChildren();
    if (!ok) { statusEl.className = 'error'; statusEl.textContent = body.error; return; }
    statusEl.textContent = `${body.results.length} results in ${body.ms.toFixed(1)} ms`;
    for (const r of body.results) {
      const fig = document.createElement('figure');
      const img = document.createElement('img');
      img.src = r.thumb; img.alt = `item ${r.id}`; img.className = 'result'; img.dataset.id = r.id;
      const cap = document.createElement('figcaption');
      cap.textContent = `#${r.id}` + (r.label === null ? '' : ` label ${r.label}`) + ` ${r.score.toFixed(3)}`;
      fig.title = 'search for similar images';
      fig.addEventListener('click', () => show(new URLSearchParams({id: r.id, k: document.getElementById('k').value})));
      fig.append(img, cap); grid.append(fig);
    }
  }).catch(e => { statusEl.className = 'error'; statusEl.textContent = String(e); });
}
form.addEventListener('submit', ev => {
  ev.preventDefault();
  show(new URLSearchParams({q: document.getElementById('q').value, k: document.getElementById('k').value}));
});
</script>
</body></html>
"""
