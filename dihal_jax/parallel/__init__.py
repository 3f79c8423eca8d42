"""Ground floor: device mesh, logical-axis sharding rules, multi-process setup."""
