"""Pages and the JSON API."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import re
from pathlib import Path

from flask import (
    Blueprint,
    abort,
    current_app,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    send_file,
    url_for,
)
from flask_login import current_user, login_required, login_user, logout_user
from PIL import Image, ImageDraw

from visual_search import cache
from visual_search.app.forms import BoxForm, LoginForm, LogoutForm, UploadForm
from visual_search.images import DecodeError, DecodeSettings, load_rgb
from visual_search.roi import Detections

blueprint = Blueprint("views", __name__)
UPLOAD_ID = re.compile(r"[0-9a-f]{32}")
# Where a login may send the user on: a path of this app, nothing a browser could read as
# another host ("//host", "/\t/host", "/\\host") and no header-breaking characters.
LOCAL_PATH = re.compile(r"/(?![/\\])[A-Za-z0-9_./-]*")
MAX_BOX_ASPECT = 50  # as decode.max_aspect_ratio: a thin strip would be scaled up enormously


def _services():
    return current_app.extensions["visual_search"]


def _settings():
    return current_app.extensions["visual_search_settings"]


def _users():
    return current_app.extensions["visual_search_users"]


# Who is asking ------------------------------------------------------------------------------


def _token_user():
    """The user whose API token the request's `Authorization: Bearer` header carries."""
    header = request.headers.get("Authorization", "")
    token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
    return _users().by_token(token) if token else None


def token_required(view):
    @functools.wraps(view)
    def wrapped(*args, **kwargs):
        user = _token_user()
        if user is None:
            return jsonify(error="authentication required: send 'Authorization: Bearer TOKEN'"), 401
        g.api_user = user
        return view(*args, **kwargs)

    return wrapped


def login_or_token_required(view):
    """A page the browser and API clients both fetch: a logged-in session or an API token."""
    protected = login_required(view)

    @functools.wraps(view)
    def wrapped(*args, **kwargs):
        if not current_user.is_authenticated and _token_user() is not None:
            return view(*args, **kwargs)
        return protected(*args, **kwargs)

    return wrapped


# Reading uploads ----------------------------------------------------------------------------


def read_image(data: bytes) -> Image.Image:
    """Decode uploaded bytes (never trusting the name or MIME type), or abort with a 4xx that
    says why: 413 for too many pixels, 415 for what is not a supported image, 400 otherwise."""
    if not data:
        abort(400, "the upload is empty (0 bytes)")
    settings = DecodeSettings(max_pixels=_settings().max_pixels)
    try:
        return load_rgb(io.BytesIO(data), settings)
    except DecodeError as err:
        reason = err.reason
        if "pixels" in reason or "aspect" in reason or "bomb" in reason.lower():
            abort(413, f"image refused: {reason}")
        if "recognised image format" in reason or "HEIF" in reason:
            abort(415, f"not a supported image: {reason}; upload a JPEG, PNG or WebP")
        abort(400, f"the image cannot be decoded: {reason}")


def _shown(value) -> str:
    """A client's value for an error message, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_k(value) -> int:
    limit = _settings().max_k
    try:
        k = int(value)
    except (TypeError, ValueError):
        abort(400, f"k must be a whole number from 1 to {limit}, got {_shown(value)}")
    if not 1 <= k <= limit:
        abort(400, f"k must be from 1 to {limit}, got {_shown(k)}")
    return k


def parse_box(text: str | None, size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """'x0,y0,x1,y1' in pixels of the upright image, inside it and not empty; None for none."""
    if text is None or text.strip() in ("", "whole"):
        return None
    try:
        x0, y0, x1, y1 = (int(round(float(v))) for v in text.split(","))
    except (ValueError, OverflowError):  # OverflowError: inf, 1e400
        abort(400, f"box must be 'x0,y0,x1,y1' in pixels, got {_shown(text)}")
    w, h = size
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        abort(400, f"box {_shown(text)} is not inside the {w}x{h} image")
    bw, bh = x1 - x0, y1 - y0
    if max(bw, bh) > MAX_BOX_ASPECT * min(bw, bh):
        abort(400, f"box {bw}x{bh} is more than {MAX_BOX_ASPECT} times longer than wide")
    return x0, y0, x1, y1


# Stored uploads ----------------------------------------------------------------------------


def _upload_dir() -> Path:
    # Per user: an upload id shown to one user means nothing to another.
    digest = hashlib.sha256(current_user.get_id().encode()).hexdigest()[:16]
    path = Path(current_app.instance_path) / "uploads" / digest
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _store(image: Image.Image, data: bytes) -> str:
    upload_id = hashlib.sha256(data).hexdigest()[:32]
    path = _upload_dir() / f"{upload_id}.png"
    if not path.exists():
        # Decoded and upright; the client's name is never used. Written whole, then renamed.
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        cache.write_atomic(path, buffer.getvalue())
        path.chmod(0o600)
    return upload_id


def _load(upload_id: str) -> Image.Image:
    if not UPLOAD_ID.fullmatch(upload_id):
        abort(404, "no such upload")
    path = _upload_dir() / f"{upload_id}.png"
    if not path.is_file():
        abort(404, "no such upload (it may have been removed); upload the image again")
    return load_rgb(path)


def _detections(upload_id: str, image: Image.Image) -> Detections:
    path = _upload_dir() / f"{upload_id}.detections.json"
    if path.is_file():
        return Detections.from_record(json.loads(path.read_text()))
    with _services().detect_lock:  # one detector call at a time; the file is written whole
        if path.is_file():
            return Detections.from_record(json.loads(path.read_text()))
        found = _services().detector.detect([image])[0]
        cache.write_json(path, found.to_record())
    return found


def _box_choices(detections: Detections, names: dict) -> list[tuple[str, str, tuple]]:
    """(value, label, box) for each detected box, numbered from 1, in the detector's order."""
    choices = []
    for n, (box, score, cls) in enumerate(
        zip(detections.boxes, detections.scores, detections.classes, strict=True), start=1
    ):
        pixels = tuple(int(round(v)) for v in box)
        label = f"{n}: {names.get(int(cls), int(cls))} ({score:.2f})"
        choices.append((",".join(map(str, pixels)), label, pixels))
    return choices


# Pages -------------------------------------------------------------------------------------


@blueprint.route("/login", methods=["GET", "POST"])
def login():
    form = LoginForm()
    if form.validate_on_submit():
        user = _users().check(form.username.data, form.password.data)
        if user is not None:
            login_user(user)
            target = request.args.get("next", "")
            safe = LOCAL_PATH.fullmatch(target) is not None  # never a URL an attacker put in
            return redirect(target if safe else url_for("views.index"))
        return render_template("login.html", form=form, error="wrong user or password"), 401
    return render_template("login.html", form=form)


@blueprint.route("/logout", methods=["POST"])
@login_required
def logout():
    if LogoutForm().validate_on_submit():
        logout_user()
    return redirect(url_for("views.login"))


@blueprint.route("/")
@login_required
def index():
    return render_template("index.html", form=UploadForm(), logout=LogoutForm())


@blueprint.route("/upload", methods=["POST"])
@login_required
def upload():
    form = UploadForm()
    if not form.validate_on_submit():
        abort(400, "choose an image file to upload")
    data = form.image.data.read()
    image = read_image(data)
    return redirect(url_for("views.query", upload_id=_store(image, data)))


@blueprint.route("/query/<upload_id>", methods=["GET", "POST"])
@login_required
def query(upload_id: str):
    image = _load(upload_id)
    detections = _detections(upload_id, image)
    choices = _box_choices(detections, _services().detector.model.names)
    form = BoxForm(k=_settings().k)
    form.box.choices = [("whole", "the whole image")] + [(v, label) for v, label, _ in choices]
    if request.method == "GET":
        return render_template("query.html", form=form, upload_id=upload_id, choices=choices,
                               size=image.size, logout=LogoutForm())  # fmt: skip
    if not form.validate_on_submit():
        abort(400, "; ".join(f"{k}: {', '.join(v)}" for k, v in form.errors.items()))
    k = parse_k(form.k.data)
    box = parse_box(form.box.data, image.size)
    hits = _services().searcher.query(image.crop(box) if box else image, k)
    return render_template("results.html", hits=hits, upload_id=upload_id, box=form.box.data,
                           crop=box, run_id=_settings().run_id, logout=LogoutForm())  # fmt: skip


@blueprint.route("/query/<upload_id>/image.png")
@login_required
def query_image(upload_id: str):
    """The upload with its detected boxes drawn and numbered."""
    image = _load(upload_id)
    choices = _box_choices(_detections(upload_id, image), _services().detector.model.names)
    draw = ImageDraw.Draw(image)
    width = max(2, round(max(image.size) / 200))
    for n, (_, _, box) in enumerate(choices, start=1):
        draw.rectangle(box, outline=(255, 40, 40), width=width)
        draw.rectangle((box[0], box[1], box[0] + 9 * width, box[1] + 9 * width), fill=(255, 40, 40))
        draw.text((box[0] + width, box[1]), str(n), fill=(255, 255, 255),
                  font_size=8 * width)  # fmt: skip
    return _png(image)


@blueprint.route("/query/<upload_id>/explain/<int:item>.png")
@login_required
def explain(upload_id: str, item: int):
    image = _load(upload_id)
    box = parse_box(request.args.get("box"), image.size)
    return _png(_explain_pair(image.crop(box) if box else image, item))


@blueprint.route("/images/<int:item>")
@login_or_token_required  # the API's result URLs point here
def database_image(item: int):
    searcher = _services().searcher
    if not searcher.serves(item):
        abort(404, "no such database image")
    return send_file(searcher.image_path(item), max_age=3600)


# API ---------------------------------------------------------------------------------------


def _api_image() -> Image.Image:
    file = request.files.get("image")
    if file is None:
        abort(400, "send the image as the multipart field 'image'")
    image = read_image(file.read())
    box = parse_box(request.form.get("box"), image.size)
    return image.crop(box) if box else image


@blueprint.route("/api/search", methods=["POST"])
@token_required
def api_search():
    image = _api_image()
    k = parse_k(request.form.get("k", _settings().k))
    hits = _services().searcher.query(image, k)
    return jsonify(
        run_id=_settings().run_id,
        results=[
            {"rank": rank, "id": hit.path, "item": hit.item, "score": round(hit.score, 6),
             "label": hit.label, "url": url_for("views.database_image", item=hit.item,
                                                _external=True)}
            for rank, hit in enumerate(hits, start=1)
        ],
    )  # fmt: skip


@blueprint.route("/api/explain", methods=["POST"])
@token_required
def api_explain():
    image = _api_image()
    try:
        item = int(request.form["item"])
    except (KeyError, ValueError):
        abort(400, "send the database image's 'item' number (from /api/search)")
    return _png(_explain_pair(image, item))


@blueprint.route("/health")
def health():
    searcher = _services().searcher
    return jsonify(status="ok", run_id=_settings().run_id, dataset=searcher.cfg.dataset.name,
                   database_images=len(set(searcher.owner.tolist())))  # fmt: skip


# Helpers -----------------------------------------------------------------------------------


def _explain_pair(query: Image.Image, item: int) -> Image.Image:
    """Query overlay | result overlay, side by side."""
    services = _services()
    searcher = services.searcher
    if not searcher.serves(item):
        abort(404, "no such database image")
    result = load_rgb(searcher.image_path(item))
    with services.explain_lock:  # the CAM object keeps per-call state in its hooks
        explanation = services.explainer.explain([query], [result])
    left, right = explanation.overlays()[0]
    pair = Image.new("RGB", (left.width + right.width + 8, max(left.height, right.height)), "white")
    pair.paste(left, (0, 0))
    pair.paste(right, (left.width + 8, 0))
    return pair


def _png(image: Image.Image):
    out = io.BytesIO()
    image.save(out, format="PNG")
    out.seek(0)
    return send_file(out, mimetype="image/png")
