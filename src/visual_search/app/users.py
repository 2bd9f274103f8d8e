"""Users of the web app: salted password hashes and API token hashes in one JSON file.

Nothing secret is stored in clear: passwords are hashed by Werkzeug (scrypt), and an API token
is shown once when it is made and kept only as its SHA-256. Users are managed from the command
line (`python -m visual_search.app users ...`), never through the web.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from flask_login import UserMixin
from werkzeug.security import check_password_hash, generate_password_hash

from visual_search import cache

NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MIN_PASSWORD = 8


class UserError(ValueError):
    """A user command cannot be done; the message says why."""


@dataclass
class User(UserMixin):
    name: str

    def get_id(self) -> str:
        return self.name


class UserStore:
    """The users file (created on first write); changes are made under a lock file, so the
    server's threads and user commands run beside it never lose each other's writes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = FileLock(self.path.with_name(self.path.name + ".lock"))

    def _locked(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return self._lock

    def _read(self) -> dict:
        if not self.path.is_file():
            return {}
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"users file {self.path} is unreadable: {err}") from err

    def _write(self, users: dict) -> None:
        cache.write_json(self.path, users)
        self.path.chmod(0o600)

    def add(self, name: str, password: str) -> None:
        if not NAME.fullmatch(name):
            raise UserError(f"user name {name!r}: use 1-64 letters, digits, '_', '.' or '-'")
        if len(password) < MIN_PASSWORD:
            raise UserError(f"password too short: at least {MIN_PASSWORD} characters")
        if not password.strip():
            raise UserError("password is only spaces, which the login form cannot send")
        with self._locked():
            users = self._read()
            if name in users:
                raise UserError(f"user {name} exists")
            users[name] = {"password": generate_password_hash(password), "tokens": []}
            self._write(users)

    def remove(self, name: str) -> None:
        with self._locked():
            users = self._read()
            if users.pop(name, None) is None:
                raise UserError(f"no user {name}")
            self._write(users)

    def names(self) -> list[str]:
        return sorted(self._read())

    def get(self, name: str) -> User | None:
        return User(name) if name in self._read() else None

    def check(self, name: str, password: str) -> User | None:
        record = self._read().get(name)
        # An unknown name costs one hash check too, so timing does not tell who exists.
        known = check_password_hash(record["password"] if record else _DUMMY, password)
        return User(name) if record and known else None

    def new_token(self, name: str) -> str:
        """A new API token for `name`; only its hash is kept, so show it now."""
        token = secrets.token_urlsafe(32)
        with self._locked():
            users = self._read()
            if name not in users:
                raise UserError(f"no user {name}")
            users[name]["tokens"].append(_digest(token))
            self._write(users)
        return token

    def by_token(self, token: str) -> User | None:
        digest = _digest(token)
        for name, record in self._read().items():
            if any(hmac.compare_digest(digest, known) for known in record["tokens"]):
                return User(name)
        return None


_DUMMY = generate_password_hash(secrets.token_hex(16))


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
