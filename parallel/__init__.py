"""Everything that spans ranks: device mesh, sequence sharding, context-parallel attention, fast-weight state scan."""
