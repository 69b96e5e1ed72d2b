"""The search web server: JSON API validation (k bounds, 404 for unknown ids, no path traversal),
thumbnails rendered from an in-memory dataset and from files, and a headless-Chromium test of the page."""
import io
import json
import os
import shutil
import tempfile
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from data import build_dataset  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _pixels(images):
    return images.float().flatten(1) / 255.0


@pytest.fixture(scope="module")
def mnist_index(tmp_path_factory):
    """mnist5k train (pixel embeddings), heads aligned on 600 captions, a flat index with the heads."""
    from eval_probes.search.align import AlignConfig
    from pretrain.align import align_embeddings
    from data.captions import caption_dataset, write_captions
    from eval_probes.search.embed import embed_dataset
    from eval_probes.search.index import build_index

    root = tmp_path_factory.mktemp("serve_mnist")
    ds = build_dataset("mnist5k", "train")
    store = embed_dataset(_pixels, ds, root / "emb", shard_size=2048, dtype="float16", progress=False,
                          meta_extra={"encoder": {"kind": "packaged", "name": "pixels"},
                                      "data": {"spec": "mnist5k", "split": "train", "image_size": 28, "root": None}})
    write_captions(caption_dataset(ds, "mnist5k", "train", 0.15, seed=0), root / "captions.jsonl")
    torch.manual_seed(0)
    heads = align_embeddings(root / "emb", root / "captions.jsonl", root / "heads",
                             AlignConfig(epochs=20, batch_size=128, out_dim=64, hidden_dim=256), progress=False)
    ids, vecs = store.load()
    build_index(heads.image(vecs), ids, root / "index", kind="flat", progress=False,
                meta_extra={"embeddings": str(root / "emb"), "heads": str(root / "heads")})
    return {"index": root / "index", "labels": ds.labels.numpy()}


@pytest.fixture(scope="module")
def folder_index(tmp_path_factory):
    """An image folder (2 classes x 4 PNGs) beside a secret file and a symlink leading out of it."""
    from PIL import Image

    from eval_probes.search.embed import embed_dataset
    from eval_probes.search.index import build_index

    base = tmp_path_factory.mktemp("serve_folder")
    root = base / "images"
    rng = np.random.default_rng(0)
    for c in ("cats", "dogs"):
        (root / "train" / c).mkdir(parents=True)
        (root / "test" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / "train" / c / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / "test" / c / "0.png")
    (base / "secret.txt").write_text("not for the web")
    (root / "notes.txt").write_text("a text file under the root")
    os.symlink(base / "secret.txt", root / "link.png")
    ds = build_dataset(f"folder:{root}", "train", image_size=16)
    store = embed_dataset(_pixels, ds, base / "emb", shard_size=4, dtype="float32", progress=False,
                          meta_extra={"encoder": {"kind": "packaged", "name": "pixels"},
                                      "data": {"spec": f"folder:{root}", "split": "train", "image_size": 16,
                                               "root": str(root)}})
    ids, vecs = store.load()
    build_index(vecs, ids, base / "index", kind="flat", progress=False, meta_extra={"embeddings": str(base / "emb")})
    return {"index": base / "index", "root": root, "items": store.items()}


def _start(index_dir, max_k=100):
    from eval_probes.search.serve import make_server

    server = make_server(index_dir, port=0, max_k=max_k)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def _stop(server):
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def mnist_server(mnist_index):
    server, url = _start(mnist_index["index"], max_k=100)
    yield url
    _stop(server)


@pytest.fixture(scope="module")
def folder_server(folder_index):
    server, url = _start(folder_index["index"], max_k=5)
    yield url
    _stop(server)


def _get(url):
    """(status, content type, body bytes) of a GET, errors included."""
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.headers.get("Content-Type"), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read()


def _json(url):
    status, ctype, body = _get(url)
    assert ctype == "application/json", (status, ctype, body[:200])
    return status, json.loads(body)


# ------------------------------------------------------------------ JSON API


def test_text_search_returns_the_class(mnist_server, mnist_index):
    status, res = _json(f"{mnist_server}/search?q=a+handwritten+seven&k=12")
    assert status == 200 and res["k"] == 12 and len(res["results"]) == 12
    labels = [r["label"] for r in res["results"]]
    assert labels.count(7) >= 9, labels
    assert [r["rank"] for r in res["results"]] == list(range(1, 13))
    assert all(r["thumb"] == f"/thumb/{r['id']}.png" for r in res["results"])
    scores = [r["score"] for r in res["results"]]
    assert scores == sorted(scores, reverse=True)
    status, rr = _json(f"{mnist_server}/search?q=a+handwritten+seven&k=12&rerank=exact")
    assert status == 200 and rr["rerank"] == "exact"
    assert [r["id"] for r in rr["results"]] == [r["id"] for r in res["results"]]  # flat index: exact already


def test_id_search_finds_the_item_itself(mnist_server):
    status, res = _json(f"{mnist_server}/search?id=123&k=5")
    assert status == 200 and res["query"] == {"id": 123}
    assert res["results"][0]["id"] == 123 and res["results"][0]["score"] > 0.999


@pytest.mark.parametrize("query, status, needle", [
    ("q=seven&k=0", 400, "k must be an integer between 1 and 100, got 0"),
    ("q=seven&k=101", 400, "k must be an integer between 1 and 100, got 101"),
    ("q=seven&k=ten", 400, "k must be an integer between 1 and 100, got 'ten'"),
    ("k=5", 400, "exactly one of q"),
    ("q=seven&id=3", 400, "exactly one of q"),
    ("q=+++&k=5", 400, "exactly one of q"),
    ("id=abc", 400, "id must be an integer"),
    ("id=4000", 404, "unknown id 4000"),
    ("id=-1", 404, "unknown id -1"),
    ("q=seven&rerank=magic", 400, "unknown re-ranker 'magic'"),
    ("q=" + "x" * 501, 400, "at most 500"),
])
def test_search_validation(mnist_server, query, status, needle):
    got, res = _json(f"{mnist_server}/search?{query}")
    assert got == status and needle in res["error"], res
    ok, _ = _json(f"{mnist_server}/search?q=seven&k=100")
    assert ok == 200


def test_thumbnails_from_the_in_memory_dataset(mnist_server):
    from PIL import Image

    status, ctype, body = _get(f"{mnist_server}/thumb/7.png")
    assert status == 200 and ctype == "image/png"
    im = Image.open(io.BytesIO(body))
    assert im.size == (112, 112)  # 28 x 4, nearest-neighbour
    ds = build_dataset("mnist5k", "train")
    small = np.asarray(im)[::4, ::4]
    assert np.array_equal(small, ds.images[7, 0].numpy())  # the right digit, pixel for pixel
    assert _get(f"{mnist_server}/thumb/4000.png")[0] == 404
    assert _get(f"{mnist_server}/thumb/x.png")[0] == 400
    assert _get(f"{mnist_server}/files/anything.png")[0] == 404  # no files behind an in-memory set


def test_page_info_and_unknown_routes(mnist_server):
    status, ctype, body = _get(f"{mnist_server}/")
    assert status == 200 and ctype.startswith("text/html") and b'id="q"' in body and b'id="grid"' in body
    status, info = _json(f"{mnist_server}/api/info")
    assert info == {"kind": "flat", "count": 4000, "dim": 64, "text": True, "max_k": 100, "data": "mnist5k",
                    "split": "train"}
    assert _json(f"{mnist_server}/nope")[0] == 404


# ------------------------------------------------------------------ files and traversal


def test_folder_files_and_thumbnails(folder_server, folder_index):
    root, items = folder_index["root"], folder_index["items"]
    status, res = _json(f"{folder_server}/search?id=0&k=5")
    assert status == 200 and len(res["results"]) == 5
    first = res["results"][0]
    assert first["id"] == 0 and first["path"] == items[0]["path"]
    assert first["file"] == "/files/" + os.path.relpath(items[0]["path"], root).replace(os.sep, "/")
    status, ctype, body = _get(folder_server + first["file"])
    assert status == 200 and ctype == "image/png" and body == open(items[0]["path"], "rb").read()
    status, ctype, body = _get(f"{folder_server}/thumb/3.png")
    assert status == 200 and ctype == "image/png"
    assert _json(f"{folder_server}/search?id=0&k=6")[0] == 400  # this server's max_k is 5
    status, res = _json(f"{folder_server}/search?q=a+cat&k=3")
    assert status == 400 and "--heads" in res["error"]


@pytest.mark.parametrize("path", [
    "/files/../secret.txt",
    "/files/%2e%2e/secret.txt",
    "/files/train/../../secret.txt",
    "/files/%2E%2E%2Fsecret.txt",
    "/files//etc/passwd",
    "/files/link.png",  # a symbolic link under the root that points out of it
    "/files/notes.txt",  # under the root, but not an image
])
def test_path_traversal_is_refused(folder_server, path):
    status, ctype, body = _get(folder_server + path)
    assert status == 403, (path, status, body[:200])
    assert b"not for the web" not in body and b"root:" not in body


def test_missing_file_is_404(folder_server):
    assert _get(f"{folder_server}/files/train/cats/99.png")[0] == 404


# ------------------------------------------------------------------ the page in a real browser


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed (apt-get install chromium "
                                                          f"chromium-driver; .ci/run does it)")
def test_browser_types_a_query_and_sees_result_images(mnist_server):
    from selenium import webdriver  # the test extra; only a missing browser is a reason to skip
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1200,900"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    try:
        driver.set_page_load_timeout(30)
        driver.get(mnist_server + "/")
        box = driver.find_element(By.ID, "q")
        box.clear()
        box.send_keys("a handwritten seven")
        k = driver.find_element(By.ID, "k")
        k.clear()
        k.send_keys("8")
        box.send_keys(Keys.ENTER)
        loaded = ("return Array.from(document.querySelectorAll('#grid img.result'))"
                  ".filter(i => i.complete && i.naturalWidth > 0).length")
        WebDriverWait(driver, 30).until(lambda d: d.execute_script(loaded) == 8)
        imgs = driver.find_elements(By.CSS_SELECTOR, "#grid img.result")
        widths = [driver.execute_script("return arguments[0].naturalWidth", im) for im in imgs]
        assert widths == [112] * 8
        captions = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#grid figcaption")]
        assert sum(" label 7 " in c for c in captions) >= 6, captions
        assert "8 results" in driver.find_element(By.ID, "status").text
        # an invalid k is shown as the API's message, not as a broken grid
        k.clear()
        k.send_keys("1000")
        box.send_keys(Keys.ENTER)
        WebDriverWait(driver, 30).until(lambda d: "between 1 and 100" in d.find_element(By.ID, "status").text)
        assert driver.execute_script("return document.querySelectorAll('#grid img').length") == 0
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_serve_cli_busy_port_is_one_line(mnist_index, capsys):
    import socket

    from launch.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        rc = main(["search", "serve", "--index", str(mnist_index["index"]), "--port", str(port)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith(f"pretrain search serve: error: --port: cannot listen on 127.0.0.1:{port}")
