"""The web app on a real Corel-1k subset, real weights and a real detector: login, CSRF, the
upload -> box -> results -> heatmap flow, the JSON API, and every kind of bad upload."""

from __future__ import annotations

import io
import re
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from visual_search import serving
from visual_search.app import Settings, create_app
from visual_search.explain import Explainer
from visual_search.roi import YoloDetector

from .conftest import CASES, DATA, MODELS, needs

pytestmark = pytest.mark.slow
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """A searcher over 5 images per Corel class, the YOLO detector and a Grad-CAM explainer."""
    from hydra import compose, initialize_config_dir

    from .conftest import REPO

    needs(DATA / "corel1k" / "labels.csv")
    needs(MODELS / "yolov8n.pt")
    cache = tmp_path_factory.mktemp("cache")
    overrides = [f"paths.data={DATA}", f"paths.models={MODELS}", f"paths.cache={cache}",
                 "dataset.limit_per_class=5", "tracking.enabled=false"]  # fmt: skip
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
        roi_cfg = compose("config", overrides=["roi=yolo"]).roi
    searcher = serving.Searcher.build(cfg)
    detector = YoloDetector(roi_cfg, MODELS, cache)
    return searcher, detector, Explainer(searcher.embedder)


def _app(services, tmp_path, **settings):
    searcher, detector, explainer = services
    app = create_app(Settings(instance=tmp_path / "instance", **settings), searcher, detector,
                     explainer)  # fmt: skip
    users = app.extensions["visual_search_users"]
    users.add("ada", PASSWORD)
    return app, users.new_token("ada")


@pytest.fixture
def app(services, tmp_path):
    return _app(services, tmp_path)


def _csrf(html: str) -> str:
    return re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', html).group(1)


def _login(client):
    token = _csrf(client.get("/login").get_data(as_text=True))
    reply = client.post("/login", data={"username": "ada", "password": PASSWORD,
                                        "csrf_token": token})  # fmt: skip
    assert reply.status_code == 302
    return client


def _upload(client, data: bytes, filename: str = "a.jpg"):
    """Post an upload through the web form (with the page's CSRF token); the reply."""
    token = _csrf(client.get("/").get_data(as_text=True))
    return client.post("/upload", data={"image": (io.BytesIO(data), filename),
                                        "csrf_token": token},
                       content_type="multipart/form-data")  # fmt: skip


def _corel(n: int) -> bytes:
    return needs(DATA / "corel1k" / "images" / f"{n}.jpg").read_bytes()


def _api(client, token, data: bytes, **form):
    fields = {"image": (io.BytesIO(data), "upload.jpg"), **form}
    return client.post("/api/search", data=fields, headers={"Authorization": f"Bearer {token}"},
                       content_type="multipart/form-data")  # fmt: skip


def test_every_route_but_login_and_health_needs_a_user(app):
    app, _ = app
    client = app.test_client()
    open_routes = {"/login", "/health", "/static/<path:filename>"}
    checked = 0
    for rule in app.url_map.iter_rules():
        if rule.rule in open_routes:
            continue
        url = re.sub(r"<(?:int:)?[^>]+>", lambda m: "1" if "int:" in m.group(0) else "0" * 32,
                     rule.rule)  # fmt: skip
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            reply = client.open(url, method=method)
            if rule.rule.startswith("/api/"):
                assert reply.status_code == 401, (method, url)
            else:
                # Unauthenticated pages go to the login page (a POST without a CSRF token may be
                # refused first, which also serves nothing).
                assert reply.status_code in (302, 400), (method, url, reply.status_code)
                if reply.status_code == 302:
                    assert "/login" in reply.headers["Location"]
            checked += 1
    assert checked >= 9
    assert client.get("/health").json["status"] == "ok"


def test_wrong_password_and_wrong_token_are_refused(app):
    app, token = app
    client = app.test_client()
    csrf = _csrf(client.get("/login").get_data(as_text=True))
    reply = client.post("/login", data={"username": "ada", "password": "nope-nope",
                                        "csrf_token": csrf})  # fmt: skip
    assert reply.status_code == 401 and "wrong user or password" in reply.get_data(as_text=True)
    assert _api(client, token + "x", _corel(1)).status_code == 401
    assert _api(client, token, _corel(1)).status_code == 200


def test_forms_need_their_csrf_token(app):
    app, _ = app
    client = app.test_client()
    reply = client.post("/login", data={"username": "ada", "password": PASSWORD})
    assert reply.status_code == 400 and "CSRF" in reply.get_data(as_text=True)
    _login(client)
    reply = client.post("/upload", data={"image": (io.BytesIO(_corel(1)), "a.jpg")},
                        content_type="multipart/form-data")  # fmt: skip
    assert reply.status_code == 400


def test_session_cookie_is_httponly_and_samesite(app):
    app, _ = app
    client = app.test_client()
    _login(client)
    cookie = client.get_cookie("session")
    assert cookie.http_only and cookie.same_site == "Lax"


def test_upload_pick_a_box_results_and_heatmap(app):
    app, _ = app
    client = _login(app.test_client())
    reply = _upload(client, _corel(301), "../../etc/passwd")
    assert reply.status_code == 302
    query_url = reply.headers["Location"]
    page = client.get(query_url).get_data(as_text=True)
    boxes = re.findall(r'name="box" type="radio" value="(\d+,\d+,\d+,\d+)"', page)
    assert boxes, "the detector found nothing on a bus photo"
    assert client.get(f"{query_url}/image.png").mimetype == "image/png"
    results = client.post(query_url, data={"box": boxes[0], "k": 5, "csrf_token": _csrf(page)})
    html = results.get_data(as_text=True)
    assert results.status_code == 200
    scores = [float(s) for s in re.findall(r'class="score">([0-9.]+)<', html)]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True)
    assert "bus" in html  # labels shown; most results are buses
    explain = re.search(r'data-src="([^"]+)"', html).group(1).replace("&amp;", "&")
    heatmap = client.get(explain)
    assert heatmap.status_code == 200 and heatmap.mimetype == "image/png"
    assert Image.open(io.BytesIO(heatmap.data)).size[0] > 400  # query and result side by side
    # The client's file name is never used: only hashed names under the instance folder.
    stored = list(Path(app.instance_path).rglob("*"))
    names = r"[0-9a-f]+(\.png|\.detections\.json)?|uploads|users\.json(\.lock)?|secret_key"
    assert all(re.fullmatch(names, p.name) for p in stored), stored


def test_api_search_returns_ranked_ids_scores_and_urls(app):
    app, token = app
    client = app.test_client()
    reply = _api(client, token, _corel(702), k="7")
    assert reply.status_code == 200
    results = reply.json["results"]
    assert [r["rank"] for r in results] == list(range(1, 8))
    assert results[0]["id"] == "images/702.jpg" and results[0]["score"] > 0.999
    assert all(r["url"].startswith("http") for r in results)
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    boxed = _api(client, token, _corel(702), k="3", box="0,0,100,100")
    assert boxed.status_code == 200 and boxed.json["results"][0]["id"] != "images/702.jpg"
    # The result URLs open with the same token (and without one go to the login page).
    image = client.get(results[0]["url"], headers={"Authorization": f"Bearer {token}"})
    assert image.status_code == 200 and image.data == _corel(702)
    assert client.get(results[0]["url"]).status_code == 302
    assert client.get(results[0]["url"], headers={"Authorization": "Bearer x"}).status_code == 302


def _bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A valid PNG header claiming 900 megapixels, with a few bytes of data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))  # fmt: skip

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))  # fmt: skip


@pytest.mark.parametrize(
    ("name", "status", "message"),
    [
        ("zero", 400, "empty"),
        ("text", 415, "not a supported image"),
        ("svg", 415, "not a supported image"),
        ("heif", 415, "HEIF"),
        ("truncated", 400, "cannot be decoded"),
        ("bomb", 413, "refused"),
        ("oversized", 413, "upload too large"),
    ],
)
def test_bad_uploads_get_a_4xx_that_says_why_and_the_server_keeps_serving(
    services, tmp_path, name, status, message
):
    app, token = _app(services, tmp_path, max_upload_mb=1)
    cases = {
        "zero": CASES / "case06_not_an_image" / "zero_bytes.jpg",
        "text": CASES / "case06_not_an_image" / "plain_text_named.jpeg",
        "svg": CASES / "case06_not_an_image" / "svg_text_named.png",
        "heif": CASES / "case06_not_an_image" / "heif_brand_named.jpg",
        "truncated": CASES / "case04_truncated_jpeg" / "truncated_60pct_128x128.jpg",
    }
    if name in cases:
        data = needs(cases[name]).read_bytes()
    elif name == "bomb":
        data = _bomb_png()
    else:
        data = b"\xff\xd8\xff" + bytes(2 * 1024 * 1024)
    client = app.test_client()
    reply = _api(client, token, data)
    assert reply.status_code == status, reply.json
    assert message in reply.json["error"]
    assert _api(client, token, _corel(5)).status_code == 200
    # The web form answers the same, as a page.
    _login(client)
    page = _upload(client, data, "x.jpg")
    assert page.status_code == status and message in page.get_data(as_text=True)


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({"k": "0"}, "k must be from 1"),
        ({"k": "-3"}, "k must be from 1"),
        ({"k": str(10**12)}, "k must be from 1"),
        ({"k": "ten"}, "whole number"),
        ({"box": "0,0,5000,10"}, "not inside"),
        ({"box": "50,50,10,10"}, "not inside"),
        ({"box": "a,b,c,d"}, "x0,y0,x1,y1"),
    ],
)
def test_bad_k_and_box_get_400(app, form, message):
    app, token = app
    reply = _api(app.test_client(), token, _corel(9), **form)
    assert reply.status_code == 400 and message in reply.json["error"]


def test_picked_box_outside_the_image_gets_400(app):
    app, _ = app
    client = _login(app.test_client())
    url = _upload(client, _corel(301), "a.jpg").headers["Location"]
    page = client.get(url).get_data(as_text=True)
    reply = client.post(url, data={"box": "0,0,9999,9999", "k": 5, "csrf_token": _csrf(page)})
    assert reply.status_code == 400


@pytest.fixture
def live_server(app):
    """The app behind waitress (the production server) on a free local port."""
    import socket
    import threading

    from waitress.server import create_server

    app, _ = app
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server(app, host="127.0.0.1", port=port, threads=4)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    server.close()


def _chromium():
    import shutil

    from .conftest import REQUIRE_INPUTS

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        message = "chromium and chromedriver are not installed (make browser installs them)"
        if REQUIRE_INPUTS:
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--window-size=1280,1400"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(driver))


def test_real_browser_logs_in_uploads_picks_a_box_and_sees_results_and_a_heatmap(live_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    from .conftest import REPO

    image = needs(DATA / "corel1k" / "images" / "301.jpg")
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    browser = _chromium()
    wait = WebDriverWait(browser, 60)
    try:
        browser.get(f"{live_server}/")
        assert "/login" in browser.current_url  # not logged in yet
        browser.find_element(By.NAME, "username").send_keys("ada")
        browser.find_element(By.NAME, "password").send_keys(PASSWORD)
        browser.find_element(By.CSS_SELECTOR, "#login button").click()
        wait.until(ready.presence_of_element_located((By.ID, "upload")))
        browser.find_element(By.NAME, "image").send_keys(str(image))
        browser.find_element(By.CSS_SELECTOR, "#upload button").click()
        wait.until(ready.presence_of_element_located((By.ID, "choose")))
        boxes = [
            r for r in browser.find_elements(By.NAME, "box") if r.get_attribute("value") != "whole"
        ]
        assert boxes, "no detected box to pick"
        boxes[0].click()
        browser.find_element(By.CSS_SELECTOR, "#choose button").click()
        wait.until(ready.presence_of_element_located((By.ID, "results")))
        scores = [float(e.text) for e in browser.find_elements(By.CLASS_NAME, "score")]
        assert len(scores) == 10 and scores == sorted(scores, reverse=True)
        browser.find_element(By.CSS_SELECTOR, "button.explain").click()
        heatmap = browser.find_element(By.CSS_SELECTOR, "img.heatmap")
        wait.until(lambda _: browser.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth", heatmap))  # fmt: skip
        assert heatmap.get_property("naturalWidth") > 400
        browser.save_screenshot(str(artifacts / "browser-results.png"))
    finally:
        browser.quit()
    assert (artifacts / "browser-results.png").stat().st_size > 10_000


def test_uploaded_photo_is_stored_upright_from_its_exif_orientation(app):
    app, _ = app
    client = _login(app.test_client())
    rotated = needs(CASES / "case01_exif_orientation" / "orientation6_64x32_stored.jpg")
    url = _upload(client, rotated.read_bytes(), "r.jpg").headers["Location"]
    shown = Image.open(io.BytesIO(client.get(f"{url}/image.png").data))
    assert shown.size == (32, 64)  # stored 64 x 32 with orientation 6: upright it is 32 x 64


@pytest.mark.parametrize("box", ["inf,0,10,10", "1e400,0,10,10", "-inf,0,5,5", "0,0,2,200"])
def test_infinite_and_strip_boxes_get_400_not_500(app, box):
    app, token = app
    reply = _api(app.test_client(), token, _corel(9), box=box)
    assert reply.status_code == 400, reply.json


@pytest.mark.parametrize("target", ["/%09/evil.example", "//evil.example", "https://evil.example",
                                    "/%0A/evil.example", "/\\evil.example"])  # fmt: skip
def test_login_never_redirects_off_site(app, target):
    app, _ = app
    client = app.test_client()
    csrf = _csrf(client.get("/login").get_data(as_text=True))
    reply = client.post(f"/login?next={target}", data={"username": "ada", "password": PASSWORD,
                                                       "csrf_token": csrf})  # fmt: skip
    assert reply.status_code == 302 and reply.headers["Location"] == "/"


def test_concurrent_first_views_of_an_upload_all_succeed(app):
    from concurrent.futures import ThreadPoolExecutor

    app, _ = app
    client = _login(app.test_client())
    url = _upload(client, _corel(777), "a.jpg").headers["Location"]
    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda u: client.get(u).status_code,
                              [url, f"{url}/image.png"] * 6))  # fmt: skip
    assert codes == [200] * 12


def test_only_images_of_the_served_database_are_shown_or_explained(app):
    app, token = app
    client = _login(app.test_client())
    searcher = app.extensions["visual_search"].searcher
    served = int(searcher.owner[0])
    unserved = next(i for i in range(len(searcher.dataset.items)) if not searcher.serves(i))
    assert client.get(f"/images/{served}").status_code == 200
    assert client.get(f"/images/{unserved}").status_code == 404  # listed, but not searched
    assert client.get(f"/images/{len(searcher.dataset.items)}").status_code == 404
    fields = {"image": (io.BytesIO(_corel(1)), "q.jpg"), "item": str(unserved)}
    reply = client.post("/api/explain", data=fields, headers={"Authorization": f"Bearer {token}"},
                        content_type="multipart/form-data")  # fmt: skip
    assert reply.status_code == 404


def test_an_unreadable_users_file_is_a_json_503_on_the_api(app):
    app, token = app
    users = Path(app.instance_path) / "users.json"
    saved = users.read_text()
    try:
        users.write_text("{not json")
        reply = _api(app.test_client(), token, _corel(1))
        assert reply.status_code == 503 and "cannot read its users" in reply.json["error"]
    finally:
        users.write_text(saved)
    assert _api(app.test_client(), token, _corel(1)).status_code == 200
