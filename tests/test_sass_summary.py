"""tools/sass_summary.py on a hand-written SASS listing (no CUDA tools needed)."""

import importlib.util
import pathlib

import pytest

TOOL = pathlib.Path(__file__).resolve().parent.parent / "tools" / "sass_summary.py"

# Two functions in cuobjdump's layout: a loop with two GEMMs around a spill, a guarded
# branch and three exp2; and a kernel without GEMMs whose spill lies outside any loop.
LISTING = """
        code for sm_90a
                Function : _Z6loopedv
        .headerflags    @"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   STL [R1], R2 ;                       /* 0x0000000201007387 */
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;   /* 0x0 */
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;  /* 0x0 */
        /*0030*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;      /* 0x0 */
        /*0040*/                   MUFU.EX2 R3, R4 ;                    /* 0x0 */
        /*0050*/                   MUFU.EX2 R5, R6 ;                    /* 0x0 */
        /*0060*/                   LDL R7, [R1] ;                       /* 0x0 */
        /*0070*/               @P0 MUFU.EX2 R8, R9 ;                    /* 0x0 */
        /*0080*/                   BAR.SYNC.DEFER_BLOCKING 0x1, 0x100 ;  /* 0x0 */
        /*0090*/                   HGMMA.64x128x16.F32.BF16 R56, R3, gdesc[UR12], R56 ;  /* 0x0 */
        /*00a0*/                   EXIT ;                               /* 0x0 */
        ..........
                Function : _Z5plainv
        /*0000*/                   STL [R1], R2 ;                       /* 0x0 */
        /*0010*/                   EXIT ;                               /* 0x0 */
"""


@pytest.fixture(name="tool")
def fixture_tool():
  spec = importlib.util.spec_from_file_location("sass_summary", TOOL)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_counts_per_kernel(tool):
  found = tool.kernels(LISTING)
  assert sorted(found) == ["_Z5plainv", "_Z6loopedv"]
  looped = tool.summary(found["_Z6loopedv"])
  assert looped == {
    "instructions": 11,
    "hgmma": 3,
    "exp2": 3,  # the guarded one counts
    "spill_ops": 2,
    "spill_ops_in_loop": 1,  # the LDL between the first and last HGMMA, not the STL before
    "loop_span": 9,
    "bar_sync": 1,
  }
  plain = tool.summary(found["_Z5plainv"])
  assert plain["spill_ops"] == 1 and plain["spill_ops_in_loop"] == 0 and plain["loop_span"] == 0


def test_trace_collapses_runs(tool):
  ops = tool.trace(tool.kernels(LISTING)["_Z6loopedv"])
  assert ops == (
    "HGMMA.64x64x16.F32.BF16x2 WARPGROUP.DEPBAR.LE MUFU.EX2x3 BAR.SYNC.DEFER_BLOCKING HGMMA.64x128x16.F32.BF16"
  )


def test_cli_compares_two_inputs(tool, tmp_path, capsys):
  first = tmp_path / "a.sass"
  first.write_text(LISTING)
  second = tmp_path / "b.sass"
  second.write_text(LISTING.replace("        /*0060*/                   LDL R7, [R1] ;", ""))
  tool.main([str(first), str(second), "--kernel", "loop"])
  out = capsys.readouterr().out
  assert f"#1 = {first}" in out and f"#2 = {second}" in out
  rows = [line.split() for line in out.splitlines() if line.startswith("  #")]
  assert [row[:2] for row in rows] == [["#1", "a.sass"], ["#2", "b.sass"]]
  assert rows[0][2:] == ["11", "3", "3", "2", "1", "9", "1"]
  assert rows[1][2:] == ["10", "3", "3", "1", "0", "8", "1"]


def test_no_match_is_an_error(tool, tmp_path):
  listing = tmp_path / "a.sass"
  listing.write_text(LISTING)
  with pytest.raises(SystemExit, match="no kernel matches"):
    tool.main([str(listing), "--kernel", "absent"])
