# The sm90a grouped GEMM configurations: the one list of them. Each row is
# compiled in a translation unit of its own, generated from sm90_config.cu.in
# (about 4.5 GB and a minute of nvcc each, so every row costs build time), and
# listed for the dispatcher in the generated sm90_config_list.h.
#
# Rows are in the order of the rows per expert they suit, fewest first: a
# build of a subset (FUSED_MOE_SM90_CONFIGS=swap_64x16x128,coop_128x256x64)
# runs the nearest built row wherever the heuristic (grouped_gemm.cu) asks for
# one that is not built.
#
# swap_*: out^T = w[e] a_e^T, the weights on the MMA's M side, for few rows per
# expert (the rows only fill the narrow N side of the tile). The others: plain
# out = a_e w[e]^T. Every cluster is 1x1: a 2x1 cluster's persistent grid would
# need max_active_clusters set, else the clusters that do not fit at once run
# after all the others have finished.
#
# Inputs: 16bit (bf16/fp16 a and w, as the output); fp8_block (e4m3 a and w
# with fp32 scales per row per 128 columns of a and per 128x128 block of w:
# DeepSeek-V3's scheme; K tiles of 128, one scale block each); or fp8_rowcol
# (e4m3 a and w, a scaled per row or per tensor, w per output channel or per
# expert: the channel and tensor schemes; the scales multiply the fp32
# accumulator in the epilogue, so the mainloop is the plain FP8 one). Each
# kind is ordered on its own; the dispatcher only picks among rows of the
# input kind.
#
#   name                 schedule     tile M N K    swap A/B  inputs
set(FUSED_MOE_SM90_CONFIG_TABLE
  # One token over few experts (decode with narrow experts): 64-row weight
  # tiles give twice the CTAs of swap_128x16x128, so every SM streams weights.
  "swap_64x16x128    Pingpong     64 16 128     true  16bit"
  # Few rows per expert (decode): a 16-row N side; deep K tiles keep many
  # weight bytes in flight.
  "swap_128x16x128   Pingpong     128 16 128    true  16bit"
  # Up to ~32 rows per expert.
  "swap_128x32x128   Pingpong     128 32 128    true  16bit"
  # Up to ~64 rows per expert.
  "swap_128x64x64    Pingpong     128 64 64     true  16bit"
  # A few hundred rows per expert: 64-row tiles pad each expert's last tile by
  # half as much as 128-row ones. Pingpong: each consumer warp group owns a
  # whole 64x256 tile, and one's epilogue overlaps the other's mainloop.
  "ping_64x256x64    Pingpong     64 256 64     false  16bit"
  # Many rows per expert (prefill): the largest tile.
  "coop_128x256x64   Cooperative  128 256 64    false  16bit"
  # FP8 with block scales, fewest rows per expert first as above.
  "fp8_swap_128x16x128  Pingpong  128 16 128   true   fp8_block"
  "fp8_swap_128x32x128  Pingpong  128 32 128   true   fp8_block"
  "fp8_swap_128x64x128  Pingpong  128 64 128   true   fp8_block"
  "fp8_ping_64x128x128  Pingpong  64 128 128   false  fp8_block"
  "fp8_coop_128x128x128 Cooperative 128 128 128 false fp8_block"
  # FP8 with row/col scales. No scales in the K loop leaves registers and
  # shared memory for 256-wide tiles: few rows per expert (a 32-row N side),
  # up to a few hundred, many.
  "rowcol_swap_128x32x128  Pingpong     128 32 128   true   fp8_rowcol"
  "rowcol_ping_64x256x128  Pingpong     64 256 128   false  fp8_rowcol"
  "rowcol_coop_128x256x128 Cooperative  128 256 128  false  fp8_rowcol"
)
