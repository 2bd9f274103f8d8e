"""The web app: log in, upload an image, pick a detected box, see ranked results and why.

`create_app` is the Flask app factory. It serves one `serving.Searcher` (the configuration a
tracked run chose) with the detector for the box step and a Grad-CAM explainer; tests pass
their own. Pages need a logged-in user (Flask-Login), every form carries a CSRF token
(Flask-WTF), and the JSON API takes a bearer token made with `python -m visual_search.app users
token NAME`. `/health` alone is open.
"""

from __future__ import annotations

import logging
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask, jsonify, request
from flask_login import LoginManager
from flask_wtf.csrf import CSRFError, CSRFProtect

from visual_search.app.users import UserError, UserStore

log = logging.getLogger(__name__)


@dataclass
class Settings:
    """What the app needs besides the searcher; `configs/serve.yaml` sets each."""

    instance: Path  # users file, secret key and uploads live here
    max_upload_mb: float = 10.0
    k: int = 10
    max_k: int = 100
    max_pixels: int = 40_000_000
    explain_method: str = "gradcam"
    run_id: str = ""
    secure_cookies: bool = False  # set when served over HTTPS


@dataclass
class Services:
    searcher: Any  # serving.Searcher
    detector: Any  # roi.Detector
    explainer: Any  # explain.Explainer
    explain_lock: threading.Lock
    detect_lock: threading.Lock


def create_app(settings: Settings, searcher, detector, explainer) -> Flask:
    """An app serving `searcher`, with `detector` for the box step and `explainer` for maps."""
    from visual_search.app import views

    instance = Path(settings.instance).expanduser().resolve()
    instance.mkdir(parents=True, exist_ok=True)
    app = Flask(__name__, instance_path=str(instance))
    app.config.update(
        SECRET_KEY=_secret_key(instance / "secret_key"),
        MAX_CONTENT_LENGTH=int(settings.max_upload_mb * 1024 * 1024),
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.secure_cookies,
        REMEMBER_COOKIE_HTTPONLY=True,
        REMEMBER_COOKIE_SAMESITE="Lax",
        WTF_CSRF_TIME_LIMIT=None,  # a token lives as long as the session
    )
    app.extensions["visual_search"] = Services(
        searcher, detector, explainer, threading.Lock(), threading.Lock()
    )
    app.extensions["visual_search_settings"] = settings
    users = UserStore(instance / "users.json")
    app.extensions["visual_search_users"] = users

    csrf = CSRFProtect(app)
    for view in (views.api_search, views.api_explain):
        csrf.exempt(view)  # token-authenticated, no cookies: nothing for a forged form to ride
    login = LoginManager(app)
    login.login_view = "views.login"
    login.user_loader(users.get)

    @login.unauthorized_handler
    def _unauthorized():
        if request.path.startswith("/api/"):
            return jsonify(error="authentication required: send 'Authorization: Bearer TOKEN'"), 401
        from flask import redirect, url_for

        return redirect(url_for("views.login", next=request.path))

    app.register_blueprint(views.blueprint)
    _errors(app)
    return app


def _secret_key(path: Path) -> str:
    """The session signing key: made once per instance folder, readable by its owner only."""
    if not path.is_file():
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_text().strip()


def _errors(app: Flask) -> None:
    from flask import render_template

    def reply(code: int, message: str):
        if request.path.startswith("/api/") or request.accept_mimetypes.best == "application/json":
            return jsonify(error=message), code
        return render_template("error.html", code=code, message=message), code

    @app.errorhandler(413)
    def _too_large(err):
        if getattr(err, "description", "").startswith("image refused"):
            return reply(413, err.description)  # too many pixels, said by the decoder
        limit = app.config["MAX_CONTENT_LENGTH"] / 1024 / 1024
        return reply(413, f"upload too large: the limit is {limit:g} MB")

    @app.errorhandler(CSRFError)
    def _csrf(err):
        return reply(400, f"form expired or forged ({err.description}); reload the page")

    @app.errorhandler(400)
    @app.errorhandler(404)
    @app.errorhandler(405)
    @app.errorhandler(415)
    def _client(err):
        return reply(err.code, err.description)

    @app.errorhandler(UserError)
    def _users_file(err):
        log.error("%s", err)
        return reply(503, f"the server cannot read its users: {err}")

    @app.errorhandler(500)
    def _server(err):
        # The traceback goes to the server's log; the client gets the same kind of reply as
        # for any other error (JSON on the API), not a bare HTML page.
        return reply(500, "internal error; the server log has the details")
