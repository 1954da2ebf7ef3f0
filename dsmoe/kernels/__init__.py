"""Fast paths for the MoE hot path. The model reaches them only through `ops`; `reference` is the spec."""
