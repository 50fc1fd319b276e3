"""tools/wheelhouse.py planning, tested with fake installed lists (no network, pip is not run)."""

import importlib.util
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("wheelhouse", ROOT / "tools" / "wheelhouse.py")
wh = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wh)

FREEZE = """\
# GPU image
torch==2.11.0
triton==3.6.0
numpy==2.1.0
Transformers==4.40.0
safetensors==0.4.5
my_local_pkg @ file:///tmp/my_local_pkg
-e git+https://example.com/x.git#egg=x
pyarrow==17.0.0
"""


def _target(**kw):
    return wh.Target(kw.get("py", "3.12"), kw.get("platform", "linux-x86_64"), wh.parse_freeze(FREEZE))


def test_parse_freeze_normalises_names_and_skips_options():
    got = wh.parse_freeze(FREEZE)
    assert got["transformers"] == "4.40.0" and got["my-local-pkg"] == "" and got["torch"] == "2.11.0"
    assert "x" not in got and len(got) == 7
    with pytest.raises(ValueError, match="name==version"):
        wh.parse_freeze("just-a-name\n")


def test_plan_picks_missing_and_too_old_only():
    reqs = ["torch>=2.11", "transformers>=4.51", "tyro>=0.9", "numpy>=1.26", "Math_Verify>=0.7", "tyro<2"]
    names = {r.name: str(r.specifier) for r in wh.plan(reqs, _target())}
    assert set(names) == {"transformers", "tyro", "Math_Verify"}
    assert names["tyro"] in ("<2,>=0.9", ">=0.9,<2")  # both specifiers of a repeated name kept


def test_plan_evaluates_markers_for_the_target_python_and_skips_fetched():
    reqs = ['tomli>=2; python_version < "3.11"', 'typing-extensions>=4; python_version >= "3.12"',
            'pytest; extra == "dev"', "shtab>=1"]
    assert [r.name for r in wh.plan(reqs, _target(py="3.10"))] == ["tomli", "shtab"]
    assert [r.name for r in wh.plan(reqs, _target(py="3.12"))] == ["typing-extensions", "shtab"]
    assert wh.plan(reqs, _target(py="3.12"), already={"typing-extensions", "shtab"}) == []


def test_project_requirements_expand_self_referencing_extras():
    reqs = wh.project_requirements(ROOT / "pyproject.toml", ["dev"])
    names = {wh.Requirement(r).name for r in reqs}
    assert {"torch", "tyro", "pytest", "ruff", "openai"} <= names and "miles-fsdp" not in names
    with pytest.raises(ValueError, match="extra 'nope'"):
        wh.project_requirements(ROOT / "pyproject.toml", ["nope"])


def test_download_cmd_targets_python_and_platform(tmp_path):
    req = wh.Requirement("uvicorn[standard]>=0.29")
    cmd = wh.download_cmd(req, tmp_path, _target(py="3.12", platform="linux-aarch64"))
    assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and "--only-binary=:all:" in cmd
    assert cmd[cmd.index("--python-version") + 1] == "3.12" and cmd[cmd.index("--dest") + 1] == str(tmp_path)
    assert "manylinux2014_aarch64" in cmd and cmd[-1] == "uvicorn[standard]>=0.29"


def test_wheel_requires_reads_metadata(tmp_path):
    wheel = tmp_path / "tyro-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("tyro-0.9.0.dist-info/METADATA",
                    "Name: tyro\nVersion: 0.9.0\nRequires-Dist: docstring-parser>=0.15\n"
                    "Requires-Dist: pytest; extra == \"dev\"\n")
    reqs = wh.wheel_requires(wheel)
    assert reqs == ["docstring-parser>=0.15", 'pytest; extra == "dev"']
    assert [r.name for r in wh.plan(reqs, _target())] == ["docstring-parser"]
