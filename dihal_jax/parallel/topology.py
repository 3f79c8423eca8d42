"""The accelerator topologies `dihal plan` knows: devices, hosts, memory and peak FLOP/s.

A topology is what JAX sees: `devices` is `jax.device_count()` on it (a v4
chip is one device: its two TensorCores run as one "megacore"), `hosts` the
number of processes. `ici_hosts` says how far the fast interconnect reaches:
a TPU slice links all its chips by ICI across hosts, an H100 node links its 8
GPUs by NVLink and nodes by the (slower) data-centre network.

The numbers are nominal, from the public spec pages (Cloud TPU system
architecture pages for v4, v5e and v5p; the NVIDIA H100 SXM datasheet, dense
bf16 without sparsity). Real usable memory is a little lower (runtime
reservations, GB vs GiB on the GPU sheet) and real FLOP/s much lower: `plan`
applies a headroom to the memory and an MFU to the FLOP/s, and says so.
"""

from __future__ import annotations

import dataclasses

from dihal_jax.errors import UserInputError

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Topology:
  """One accelerator configuration (see the module docstring)."""

  name: str
  description: str
  devices: int           # jax.device_count()
  hosts: int             # processes (jax.process_count())
  hbm_bytes: int         # memory per device, nominal
  peak_flops: float      # dense bf16 FLOP/s per device, nominal
  ici_hosts: bool        # True: one fast interconnect spans every host (a TPU slice)

  @property
  def devices_per_host(self) -> int:
    return self.devices // self.hosts


TOPOLOGIES = {t.name: t for t in (
    Topology("v5e-8", "TPU v5e-8: 8 chips, 1 host", devices=8, hosts=1,
             hbm_bytes=16 * GIB, peak_flops=197e12, ici_hosts=True),
    Topology("v5e-16", "TPU v5e-16: 16 chips (4x4), 4 hosts", devices=16, hosts=4,
             hbm_bytes=16 * GIB, peak_flops=197e12, ici_hosts=True),
    Topology("v4-32", "TPU v4-32: 16 chips (32 TensorCores, megacore), 4 hosts", devices=16,
             hosts=4, hbm_bytes=32 * GIB, peak_flops=275e12, ici_hosts=True),
    Topology("v5p-8", "TPU v5p-8: 4 chips, 1 host", devices=4, hosts=1,
             hbm_bytes=95 * GIB, peak_flops=459e12, ici_hosts=True),
    Topology("h100x8", "1x8 H100 80GB SXM: 8 GPUs, 1 host (NVLink)", devices=8, hosts=1,
             hbm_bytes=80 * GIB, peak_flops=989e12, ici_hosts=False),
    Topology("h100x16", "2x8 H100 80GB SXM: 16 GPUs, 2 hosts (NVLink inside, network across)",
             devices=16, hosts=2, hbm_bytes=80 * GIB, peak_flops=989e12, ici_hosts=False),
)}


def get_topology(name: str) -> Topology:
  """The topology called `name`; a UserInputError listing the known ones otherwise."""
  if name not in TOPOLOGIES:
    raise UserInputError(f"--topology={name!r}: expected one of {', '.join(TOPOLOGIES)}")
  return TOPOLOGIES[name]


def default_mesh(topology: Topology) -> dict[str, int]:
  """FSDP over the fast interconnect, data parallelism across what it does not reach."""
  data = 1 if topology.ici_hosts else topology.hosts
  return {"data": data, "fsdp": topology.devices // data, "tensor": 1}
