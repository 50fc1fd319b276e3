"""tools/bench/with_tiles.py: the script runs with the small-M tiles changed as asked (its argv
passed on), or with another FILL; malformed or unknown tiles are refused with a message naming the
spec."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "kernels")])}
SCRIPT = """
import json, sys, torch
from miles_kernels import _fast_pick
from miles_kernels._triton import fused_linears, matmul, paged_attention
from miles_fsdp.engine import sampler
json.dump({"argv": sys.argv, "tiles": [list(t) for t in matmul.SMALL_M_TILES[torch.float16]], "fill": matmul.FILL,
           "fill_max_m": matmul.FILL_MAX_M, "small_tma": fused_linears.SMALL_M_TMA,
           "gluon_paged": paged_attention.GLUON_PAGED, "fast_pick": _fast_pick.PICK, "sampler_screen": sampler.SCREEN,
           "linears_tma_store": fused_linears.TMA_STORE}, open(sys.argv[1], "w"))
"""


def _run(tmp_path, *args, env=ENV):
    return subprocess.run([sys.executable, str(ROOT / "tools/bench/with_tiles.py"), *args], capture_output=True,
                          text=True, timeout=300, env=env)


def _show(tmp_path, *args) -> dict:
    """Run SCRIPT under with_tiles.py with args (then `-- SCRIPT OUT`) and return what it saw."""
    script, out = tmp_path / "show.py", tmp_path / "out.json"
    script.write_text(SCRIPT)
    proc = _run(tmp_path, *args, "--", str(script), str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


def test_script_sees_the_changed_tiles(tmp_path):
    script, out = tmp_path / "show.py", tmp_path / "out.json"
    script.write_text(SCRIPT)
    proc = _run(tmp_path, "--unroll", "64x32=2:6", "64x16=4:3", "--", str(script), str(out), "--flag")
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(out.read_text())
    assert got["argv"] == [str(script), str(out), "--flag"]
    from miles_kernels._triton import matmul  # the table as shipped, for the tiles left alone

    base = [list(t) for t in matmul.SMALL_M_TILES[matmul.torch.float16]]
    changed = {(64, 32): (2, 6), (64, 16): (4, 3)}
    assert len(got["tiles"]) == len(base)
    for new, old in zip(got["tiles"], base):
        key = (old[1], old[2])
        if key in changed and not old[7]:
            assert new[:6] == old[:6] and (new[8], new[6]) == changed[key]
        else:
            assert new == old


def test_tma_stages(tmp_path):
    """--tma-stages: the small-M TMA tiles named get S stages, every other tile stays as shipped."""
    from miles_kernels._triton import matmul

    base = [list(t) for t in matmul.SMALL_M_TILES[matmul.torch.float16]]
    want = {(old[1], old[2]): old[6] + 1 + i for i, old in enumerate(base) if old[7]}  # each TMA tile moved
    assert len(want) >= 2
    got = _show(tmp_path, "--tma-stages", *(f"{bm}x{bn}={s}" for (bm, bn), s in want.items()))["tiles"]
    assert len(got) == len(base)
    for new, old in zip(got, base):
        if old[7]:
            assert new[:6] == old[:6] and new[7:] == old[7:] and new[6] == want[old[1], old[2]]
        else:
            assert new == old


def test_small_table(tmp_path):
    """--small-table: the whole small-M table as given, in that order (BLOCK_K 64, group 8 for TMA tiles)."""
    got = _show(tmp_path, "--small-table", "128x128:tma:8:5", "64x128:tma:4:8", "64x16:ptr:4:8:2")["tiles"]
    assert got == [[512, 128, 128, 64, 8, 8, 5, True, 1], [512, 64, 128, 64, 8, 4, 8, True, 1],
                   [512, 64, 16, 64, 1, 4, 8, False, 2]]


def test_fill_alone(tmp_path):
    got = _show(tmp_path, "--fill", "0.75")
    from miles_kernels._triton import matmul

    assert got["fill"] == 0.75 != matmul.FILL and got["fill_max_m"] == matmul.FILL_MAX_M
    assert got["tiles"] == [list(t) for t in matmul.SMALL_M_TILES[matmul.torch.float16]]


@pytest.mark.parametrize("switch", ["small-tma", "gluon-paged", "fast-pick", "sampler-screen", "linears-tma-store"])
@pytest.mark.parametrize("flag,want", [("on", True), ("off", False)])
def test_switches(tmp_path, switch, flag, want):
    """--small-tma / --gluon-paged / --fast-pick / --sampler-screen / --linears-tma-store on|off set
    fused_linears.SMALL_M_TMA, paged_attention.GLUON_PAGED, _fast_pick.PICK, sampler.SCREEN,
    fused_linears.TMA_STORE for the script; the rest stays as shipped."""
    got = _show(tmp_path, f"--{switch}", flag)
    from miles_kernels import _fast_pick
    from miles_kernels._triton import fused_linears, matmul, paged_attention

    from miles_fsdp.engine import sampler

    shipped = {"small_tma": fused_linears.SMALL_M_TMA, "gluon_paged": paged_attention.GLUON_PAGED,
               "fast_pick": _fast_pick.PICK, "sampler_screen": sampler.SCREEN,
               "linears_tma_store": fused_linears.TMA_STORE}
    key = switch.replace("-", "_")
    assert got[key] is want
    assert {k: got[k] for k in shipped if k != key} == {k: v for k, v in shipped.items() if k != key}
    assert got["tiles"] == [list(t) for t in matmul.SMALL_M_TILES[matmul.torch.float16]]


def test_fill_max_m_moves_the_picks_above_small_m(tmp_path):
    """--fill-max-m 512: the script's picker takes M 1,024 x N 1,024's tile from the M bucket (128x128 TMA,
    64 tiles on 132 SMs); as shipped the fill rule takes 128x64 there."""
    script, out = tmp_path / "show.py", tmp_path / "out.json"
    script.write_text(SCRIPT + """
matmul._num_programs = lambda device: 132
got = json.load(open(sys.argv[1]))
got["pick"] = list(matmul.linear_tile(1024, torch.bfloat16, 1024, torch.device("cuda")))
json.dump(got, open(sys.argv[1], "w"))
""")
    proc = _run(tmp_path, "--fill-max-m", "512", "--", str(script), str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    from miles_kernels._triton import matmul

    got = json.loads(out.read_text())
    assert got["fill_max_m"] == 512 != matmul.FILL_MAX_M and got["fill"] == matmul.FILL
    assert got["pick"][1:3] == [128, 128] and got["pick"][7] is True


def test_bad_specs_are_refused(tmp_path):
    for args, msg in ((["--unroll", "64x32=2", "--", "x.py"], "write BMxBN=U:S"),
                      (["--unroll", "64x48=2:6", "--", "x.py"], "no small-M pointer tile [(64, 48)]"),
                      (["--unroll", "64x32=0:6", "--", "x.py"], "must be >= 1"),
                      (["--unroll", "64x32=2:6"], "usage"),
                      (["--", "x.py"], "nothing to change"),
                      (["--fill", "0", "--", "x.py"], "must be in (0, 4]"),
                      (["--fill-max-m", "0", "--", "x.py"], "must be >= 1"),
                      (["--tma-stages", "64x32=5", "--", "x.py"], "no small-M TMA tile [(64, 32)]"),
                      (["--tma-stages", "128x128", "--", "x.py"], "write BMxBN=S"),
                      (["--tma-stages", "128x128=0", "--", "x.py"], "S must be >= 1"),
                      (["--small-table", "64x128:tma:4:8:2", "--", "x.py"], "write BMxBN:tma:W:S"),
                      (["--small-table", "64x128:tmx:4:8", "--", "x.py"], "write BMxBN:tma:W:S"),
                      (["--small-table", "96x128:tma:4:8", "--", "x.py"], "BM 64 or 128"),
                      (["--small-table", "64x48:ptr:4:8", "--", "x.py"], "BN a power of two"),
                      (["--small-table", "64x64:ptr:4:6", "--tma-stages", "128x128=6", "--", "x.py"],
                       "give one or the other"),
                      (["--small-tma", "yes", "--", "x.py"], "invalid choice"),
                      (["--gluon-paged", "1", "--", "x.py"], "invalid choice")):
        proc = _run(tmp_path, *args)
        assert proc.returncode != 0 and msg in proc.stderr, (args, proc.stderr[-500:])


@pytest.mark.parametrize("flag,attr,shipped", [("--pdl", "PDL", True), ("--pdl-tma", "PDL_TMA", True)])
def test_pdl_switches(tmp_path, flag, attr, shipped):
    """--pdl / --pdl-tma on|off set launch.PDL / launch.PDL_TMA for the script; as shipped both are
    on (MILES_PDL and MILES_PDL_TMA unset)."""
    script, out = tmp_path / "show.py", tmp_path / "out.json"
    script.write_text(f"""
import json, sys
from miles_kernels._triton import launch
json.dump({{"on": launch.{attr}}}, open(sys.argv[1], "w"))
""")
    env = {k: v for k, v in ENV.items() if k not in ("MILES_PDL", "MILES_PDL_TMA")}
    for args, want in (([flag, "off"], False), ([flag, "on"], True)):
        proc = _run(tmp_path, *args, "--", str(script), str(out), env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads(out.read_text())["on"] is want, args
    plain = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, env=env)
    assert plain.returncode == 0 and json.loads(out.read_text())["on"] is shipped, plain.stderr[-2000:]
