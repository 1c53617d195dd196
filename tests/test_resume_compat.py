"""A run written by an older fedlora resumes under a newer one: keys added since take their defaults."""

from __future__ import annotations

from tests.conftest import tiny_config


def test_a_run_recorded_before_keys_were_added_resumes_with_them_at_their_defaults() -> None:
    from fedlora.checkpoint import config_changes, with_defaults

    now = tiny_config().model_dump(mode="json")
    older = {**now, "data": {k: v for k, v in now["data"].items() if k != "corpus"}}
    older.pop("evaluation", None)
    older["model"] = {**now["model"], "tiny": {k: v for k, v in now["model"]["tiny"].items() if not k.startswith("pretrain")}}
    assert config_changes(older, now)  # compared as recorded, every added key looks changed
    assert config_changes(with_defaults(older), now) == []
    changed = {**older, "seed": 8}
    assert config_changes(with_defaults(changed), now) == ["seed"]
