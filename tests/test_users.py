"""The users file: names, passwords and writes from several processes at once."""

from __future__ import annotations

import multiprocessing

import pytest

from visual_search.app.users import UserError, UserStore


def _add(path, name):
    UserStore(path).add(name, f"password-of-{name}")


def test_users_added_by_processes_at_once_are_all_kept(tmp_path):
    path = tmp_path / "instance" / "users.json"
    names = [f"u{i}" for i in range(8)]
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_add, args=(path, n)) for n in names]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    store = UserStore(path)
    assert store.names() == names
    assert all(store.check(n, f"password-of-{n}") for n in names)


@pytest.mark.parametrize(
    ("name", "password", "message"),
    [
        ("bob\n", "long-enough", "user name"),
        ("", "long-enough", "user name"),
        ("../x", "long-enough", "user name"),
        ("bob", "short", "too short"),
        ("bob", " " * 12, "only spaces"),
    ],
)
def test_names_and_passwords_the_login_form_could_not_use_are_refused(tmp_path, name, password,
                                                                      message):  # fmt: skip
    store = UserStore(tmp_path / "users.json")
    with pytest.raises(UserError, match=message):
        store.add(name, password)
    assert store.names() == []
