"""`mm serve` on the state `mm demo` leaves (the session's `demo` fixture): the official
`openai` client against its OpenAI-compatible endpoints, /openapi.json, media by hash for
its tenant only, the search page in headless Chromium, and `mm search` through it."""

from __future__ import annotations

import base64
import hashlib
import io
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from mm_pipelines_tests.conftest import run_mm

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
QUERY = "a red circle on a blue background"
RED_CIRCLE = "images/red_circle_on_blue.png"


@pytest.fixture(scope="module")
def state(demo) -> dict[str, str]:
    proc, env = demo
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return env


def make_key(state: dict, *scope: str) -> str:
    proc = run_mm("keys", "create", *scope, env=state)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def admin_key(state) -> str:
    """An admin key: it names the tenant in each request, as these tests do."""
    return make_key(state, "--admin")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def server(state, tmp_path_factory) -> Iterator[str]:
    """`mm serve` on the demo's published bundle and catalog (no Whisper: text and images)."""
    log = (tmp_path_factory.mktemp("serve") / "serve.log").open("w+")
    env = {**state, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mm_pipelines.cli", "serve", "--port", "0", "--no-audio"]
    proc = subprocess.Popen(
        [*cmd, "--log-level", "warning"], stdout=subprocess.PIPE, stderr=log, text=True, env=env
    )
    try:
        line = proc.stdout.readline()
        assert "listening on" in line, f"mm serve did not start: {line!r}"
        yield line.split("listening on ", 1)[1].split()[0]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.seek(0)
        assert "Traceback" not in log.read()


@pytest.fixture(scope="module")
def client(server, admin_key):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key=admin_key, max_retries=0, timeout=120)


def landing_file(state: dict, rel: str) -> Path:
    return Path(state["MM_HOME"]) / "landing" / "demo-0001" / rel


def test_the_openai_client_embeds_text_as_floats_and_as_base64(client):
    default = client.embeddings.create(model="mm-unified", input=QUERY)  # base64 on the wire
    floats = client.embeddings.create(model="mm-unified", input=QUERY, encoding_format="float")
    a, b = np.asarray(default.data[0].embedding), np.asarray(floats.data[0].embedding)
    assert a.shape == b.shape and len(a) > 16 and np.abs(a - b).max() < 1e-6
    assert abs(np.linalg.norm(a) - 1) < 1e-4
    assert default.model == "mm-unified" and default.usage.prompt_tokens > 2
    batch = client.embeddings.create(model="mm-unified", input=[QUERY, "a green triangle"])
    assert [d.index for d in batch.data] == [0, 1]
    assert np.abs(np.asarray(batch.data[0].embedding) - a).max() < 1e-5


def test_an_image_embeds_into_the_same_space_through_the_extension_field(client, state):
    png = base64.b64encode(landing_file(state, RED_CIRCLE).read_bytes()).decode()
    image = client.embeddings.create(
        model="mm-unified", input=[], extra_body={"image_base64": png}
    ).data[0]
    texts = client.embeddings.create(
        model="mm-unified", input=[QUERY, "a yellow cross on a black background"]
    ).data
    vec = np.asarray(image.embedding)
    right, wrong = (float(vec @ np.asarray(t.embedding)) for t in texts)
    assert right > wrong + 0.1, (right, wrong)


def test_the_openai_client_lists_the_models_and_a_wrong_one_is_a_404(client):
    import openai

    ids = {m.id for m in client.models.list()}
    assert ids == {"mm-unified", "mm-lora-orange-backdrop"}
    with pytest.raises(openai.NotFoundError) as err:
        client.embeddings.create(model="text-embedding-3-small", input="x")
    assert "mm-unified" in str(err.value)


def test_the_openai_client_generates_b64_images_with_a_seed(client):
    def generate(seed: int):
        return client.images.generate(
            model="mm-lora-orange-backdrop",
            prompt="a photo of sks",
            n=2,
            response_format="b64_json",
            extra_body={"seed": seed, "steps": 2},
        )

    first, again = generate(3), generate(3)
    pngs = [base64.b64decode(d.b64_json) for d in first.data]
    assert len(pngs) == 2 and pngs[0] != pngs[1]  # seed 3 and seed 4
    image = Image.open(io.BytesIO(pngs[0]))
    assert image.format == "PNG" and first.size == f"{image.width}x{image.height}"
    assert [d.b64_json for d in again.data] == [d.b64_json for d in first.data]


def test_openapi_describes_every_route_of_the_app(server):
    from mm_pipelines.serving.app import create_app

    spec = requests.get(f"{server}/openapi.json", timeout=30).json()
    assert spec["openapi"].startswith("3.")
    app = create_app(manager=None)  # type: ignore[arg-type]  # routes only: never served
    for route in app.routes:
        methods = {m.lower() for m in route.methods or []} - {"head"}
        described = spec["paths"].get(route.path, {})
        assert methods <= set(described), (route.path, methods, sorted(described))
    assert len(spec["paths"]) == len(app.routes)


def test_media_come_by_hash_for_their_tenant_only_with_ranges(server, state, admin_key):
    data = landing_file(state, RED_CIRCLE).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    url = f"{server}/v1/media/{digest}"
    assert requests.get(url, params={"tenant": "acme"}, timeout=30).status_code == 401
    globex = make_key(state, "--tenant", "globex")  # a tenant key: its own tenant only
    assert requests.get(url, params={"key": globex}, timeout=30).status_code == 404
    mismatch = requests.get(url, params={"key": globex, "tenant": "acme"}, timeout=30)
    assert mismatch.status_code == 403
    acme = make_key(state, "--tenant", "acme")
    assert requests.get(url, params={"key": acme}, timeout=30).content == data  # as <img> asks
    auth = bearer(admin_key)
    ok = requests.get(url, params={"tenant": "acme"}, headers=auth, timeout=30)
    assert ok.status_code == 200 and ok.content == data
    assert ok.headers["content-type"] == "image/png"
    ranged = {**auth, "Range": "bytes=0-9"}
    part = requests.get(url, params={"tenant": "acme"}, headers=ranged, timeout=30)
    assert part.status_code == 206 and part.content == data[:10]
    other = requests.get(url, params={"tenant": "globex"}, headers=auth, timeout=30)
    assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"
    assert requests.get(url, headers=auth, timeout=30).status_code == 400  # no tenant
    bad = requests.get(
        f"{server}/v1/media/..%2f..%2fetc", params={"tenant": "acme"}, headers=auth, timeout=30
    )
    assert bad.status_code in (400, 404)


def test_served_search_names_files_and_ranks_across_kinds(server, admin_key):
    body = {"query": QUERY, "tenant": "acme", "k": 5}
    auth = bearer(admin_key)
    hits = requests.post(f"{server}/v1/search", json=body, headers=auth, timeout=60).json()["hits"]
    assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
    top_image = next(h for h in hits if h["kind"] == "image")
    assert top_image["name"] == "red_circle_on_blue.png"  # the first-seen name, not the copy
    assert all(h["name"] and "/" not in h["name"] for h in hits)
    assert all(h["matched_frames"] for h in hits if h["kind"] == "video")
    few = requests.post(
        f"{server}/v1/search", json={**body, "min_score": 0.99}, headers=auth, timeout=60
    )
    strong = few.json()["hits"]
    assert strong and all(h["score"] >= 0.99 for h in strong)
    assert [h["name"] for h in strong] == [h["name"] for h in hits if h["score"] >= 0.99]


def test_mm_search_asks_the_running_server(server, state, admin_key):
    env = {**state, "MM_SERVE_URL": server, "MM_API_KEY": admin_key}
    proc = run_mm("search", QUERY, "--tenant", "acme", "-k", "3", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"answered by mm serve at {server}" in proc.stderr  # no models loaded here
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3 and "red_circle_on_blue.png" in proc.stdout, proc.stdout


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium package is missing")
def test_the_search_page_shows_the_described_image_in_headless_chromium(server, tmp_path, state):
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "search_page.png"
    shot.unlink(missing_ok=True)
    key = make_key(state, "--tenant", "acme")  # the page sends it; thumbnails carry it
    url = f"{server}/?q=a+red+circle+on+a+blue+background&tenant=acme&key={key}"
    dom = _chromium(["--dump-dom", "--virtual-time-budget=20000"], tmp_path / "p1", url).stdout
    assert 'data-searched="1"' in dom, dom[-2000:]
    first = dom.split('class="card"')[1]  # the top hit's card
    image_card = next(c for c in dom.split('class="card"')[1:] if 'data-kind="image"' in c)
    assert 'data-name="red_circle_on_blue.png"' in image_card and 'data-loaded="1"' in image_card
    assert "data-rank=" in first
    assert 'data-kind="video"' in dom and "▶ 0:0" in dom  # a video moment to open
    done = _chromium([f"--screenshot={shot}", "--virtual-time-budget=20000"], tmp_path / "p2", url)
    assert shot.is_file(), done.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    print(f"\nsearch page screenshot: {shot}")


def _chromium(args: list[str], profile: Path, url: str) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1280,1000",
        *args,
        url,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)
