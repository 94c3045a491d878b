"""Puzzle NAS (Bercovich et al., 2024), one module per stage:

    library   per-layer attention / FFN variants initialised from the parent (`Variant`, `build_library`)
    bld       blockwise local distillation of every variant (decoupled, resumable, split across processes)
    scoring   replace-1-block scores: KL(parent || parent with one sub-block swapped) and LM loss
    costs     per-variant parameter bytes, KV bytes and time (cost model or measured)
    mip       the mixed-integer program that picks one attention and one FFN variant per layer
    refine    (optional) the MIP re-solved with the chosen child's measured in-context block costs
    assemble  the chosen child, saved as nemotron-nas with search.json, then global distillation
"""
