"""Reading the machine code: ptxas's notices and the SASS's main loop, on text of the shapes
``ptxas -v`` and ``cuobjdump -sass`` print (the compile report runs them on every variant:
tests/kernels/test_aot.py)."""

from __future__ import annotations

from fastvit.kernels import sass

PTXAS_OUTPUT = """\
ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to non wgmma \
instructions defining accumulator registers of a wgmma between start and end of the pipeline stage in the function \
'_attn_fwd'
ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function '_attn_fwd' for 'sm_90a'
ptxas info    : Function properties for _attn_fwd
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 71 registers, used 1 barriers
ptxas warning : Registers are spilled to local memory in function '_attn_bwd_dq', 8 bytes spill stores
"""

SASS = """\
        Function : _attn_fwd
        /*0000*/                   LDC R1, c[0x0][0x28] ;                                   /* 0x0000 */
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;                         /* 0x0000 */
        /*0020*/                   LDG.E.U16 R8, desc[UR4][R6.64] ;                         /* 0x0000 */
        /*0030*/              @!P3 BRA 0x0100 ;                                             /* 0x0000 */
        /*0040*/                   LDGSTS.E.BYPASS.128 [R10], desc[UR4][R12.64] ;          /* 0x0000 */
        /*0050*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT, gsb0 ; /* 0x0000 */
        /*0060*/                   FMUL R9, R24, R3 ;                                       /* 0x0000 */
        /*0070*/                   HGMMA.64x16x16.F32.BF16 R56, R64, gdesc[UR8].tnspB, R56 ; /* 0x0000 */
        /*0080*/              @!P0 BRA 0x0040 ;                                             /* 0x0000 */
        /*0090*/                   UTMALDG.2D [UR8], [UR4] ;                                /* 0x0000 */
        /*00a0*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR20], RZ, !UPT, gsb0 ; /* 0x0000 */
        /*00b0*/                   IADD3 R0, R0, 0x1, RZ ;                                  /* 0x0000 */
        /*00c0*/              @P1 BRA 0x00a0 ;                                              /* 0x0000 */
        /*0100*/                   EXIT ;                                                   /* 0x0000 */
        /*0110*/                   BRA 0x110;                                               /* 0x0000 */
"""


def test_notices_keep_warnings_and_numbered_notices_only():
    notices = sass.parse_notices(PTXAS_OUTPUT)
    assert len(notices) == 2
    assert notices[0].startswith("(C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized")
    assert "Registers are spilled" in notices[1]
    assert sass.SERIALIZED_WGMMA in notices[0]
    assert not sass.parse_notices("ptxas info    : Used 71 registers, used 1 barriers\n")


def test_the_main_loop_is_the_backward_branch_with_the_most_tensor_core_instructions():
    stats = sass.sass_stats(SASS)
    assert stats["instructions"] == 15
    assert stats["mma"] == 3
    # two backward branches: 0x80 -> 0x40 (two HGMMA), 0xc0 -> 0xa0 (one); the trap at 0x110 branches to itself
    assert stats["loops"] == 2
    assert (stats["loop_mma"], stats["loop_instructions"]) == (2, 5)
    assert stats["loop_mma_share"] == 0.4
    assert stats["loads"] == {"128": 2, "16": 1, "tma": 1}


def test_no_loop_and_no_tensor_cores():
    stats = sass.sass_stats("        /*0000*/                   EXIT ;   /* 0x0 */\n")
    assert stats == {"instructions": 1, "mma": 0, "loads": {}, "loops": 0, "loop_instructions": None,
                     "loop_mma": None, "loop_mma_share": None}
