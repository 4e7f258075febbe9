"""The README keeps its promises to a new user: the two commands at the top, every setting, every
error code and every exit code documented, every admin endpoint listed."""

from __future__ import annotations

from pathlib import Path

from cti_bridge.config import Settings
from cti_bridge.errors import ErrorCode, ExitCode

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_commands_at_the_top() -> None:
    top = "\n".join(README.splitlines()[:40])
    for command in ("make demo", "make test", "make run"):
        assert command in top


def test_every_setting_documented() -> None:
    for name in Settings.model_fields:
        assert f"`CTI_BRIDGE_{name.upper()}`" in README, name


def test_every_error_code_documented() -> None:
    for code in ErrorCode:
        assert f"| {int(code)} |" in README, code.name


def test_every_exit_code_documented() -> None:
    for code in ExitCode:
        assert f"| {int(code)} |" in README, code.name


def test_makefile_targets_exist() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for target in ("test:", "run:", "demo:", "bench:"):
        assert f"\n{target}" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_endpoint_listed(tmp_path: Path) -> None:
    from cti_bridge.app import build
    from cti_bridge.config import load_settings

    daemon = build(load_settings(None, database_url=f"sqlite:///{tmp_path / 'r.db'}", secret_key="r" * 40))
    try:
        assert daemon.admin_app is not None
        paths = daemon.admin_app.openapi()["paths"]
    finally:
        if daemon.lock is not None:
            daemon.lock.release()
        daemon.db.dispose()
    for path in paths:
        # README writes "…/crm-contexts/{crmContextId}/x" for the long integration paths.
        tail = path.split("/crm-contexts/")[-1] if "/crm-contexts/" in path else path.lstrip("/")
        tail = tail.replace("{crm_context_id}", "{crmContextId}").replace("{delivery_id}", "{id}")
        tail = tail.replace("{xelionContextId}/admin", "{id}/admin")
        assert tail.split("/", 1)[-1] in README or tail in README, path
