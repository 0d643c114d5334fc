"""Layer 5: aggregation over a ``torch.distributed`` process group (NCCL on GPUs, gloo on CPUs).

A Gramian method needs only the K × K Gram of the task gradients, and a Gram is a sum over columns: each rank
forms the partial Gram of its own columns, and the ranks exchange K × K numbers instead of K × N.

**Replicated layout** (DDP-style: every rank holds all N shared parameters and its own batch), per step:

1. consistency check: one all-gather of 9 integers per rank (K, N, dtype, layout, aggregator, …); ranks that
   disagree all raise :class:`DistributedStepError` instead of running mismatched collectives (which hang);
2. all-reduce of the K losses (their mean: loss-based methods see the global losses), and of the
   task-specific parameters' gradients (their mean);
3. reduce-scatter of the K × N task gradients, one row at a time (sum, then ÷ P): rank r receives columns
   [r S, (r + 1) S) of the mean over ranks, S = ⌈N / P⌉ (N is zero-padded to P S when P does not divide it:
   then each row goes through one staging row; otherwise nothing is copied). Rows that every rank already
   holds averaged (``averaged_rows``: F-MTL's clean g_i) are sliced locally instead, with no communication;
4. partial Gram of the K × S shard in float64, all-reduced (K² · 8 bytes);
5. every rank solves (so stateful aggregators stay in step) and rank 0's weights are broadcast (K numbers):
   the weights are identical bit for bit on every rank, whatever the reductions' rounding on each device;
6. each rank combines its shard, and the direction is all-gathered into ``.grad`` (N entries).

Bytes (:class:`Traffic`, G's itemsize b): reduce-scatter K · P S · b, all-gather P S · b, all-reduce 8 K² (+ 8 K
for the losses, + the task parameters); a naive all-reduce of the K × N gradients instead moves K N b — and a
ring all-reduce sends twice what a ring reduce-scatter sends, so per rank the wire traffic drops from
2 (P−1)/P · K N b to (P−1)/P · (K + 1) N b (:meth:`Traffic.wire_bytes`) — with a true reduce-scatter (NCCL's).
gloo has none: torch runs an all-reduce for it, so on gloo the step moves about (2K + 1) rows' worth, slightly
more than the naive all-reduce. float16 rows are divided by P before the sum, as DDP divides (P times a float16
gradient may overflow where the mean does not). With P = 1 the O(N) collectives are skipped (they would be
copies). A rank whose columns are all on other ranks (FSDP2 shards of a small model) takes part with an empty
shard: a zero partial Gram, an empty slice of d.

**Sharded layout** (FSDP-style — each rank owns a slice of the flat shared parameters, e.g. FSDP's reduce-scatter
has left it the mean gradients of its slice, or tensor parallelism computes the full gradient of its slice):
G is K × N_local, the step is the partial Gram, its all-reduce (8 K² bytes), the solve and the local combine;
G is never gathered. FSDP2's ``fully_shard`` parameters (DTensors) go straight into
:class:`~flatmtl_fast.FlatParameters`: their ``.grad`` are DTensors over one flat buffer, so each task pass's
reduce-scatter accumulates into this rank's slice of its row of G. The losses are still averaged (8 K bytes);
task parameters are left alone (the parallelism that shards them reduces them). With HSDP (a mesh of replicas ×
shards) the group is the shard dimension's: the replicas hold copies of the same columns, which would count twice
(:attr:`FlatParameters.shard_ranks` names the ranks; any other group raises).

**Non-Gramian aggregators** work shard-locally. GradDrop's rule is per coordinate, so GradDrop of the shard
is GradDrop of the averaged gradients on those columns — but its uniforms U_n are drawn per shard: with equal
generator states every rank draws the same seed, so coordinates n, S + n, 2 S + n, … share one uniform.
Each coordinate's draw is still U[0, 1) (the method's distribution per coordinate is unchanged), the draws are
only correlated across shards, and the result differs from a single process's draw; seeding each rank's
generator differently makes them independent (in the replicated layout the gathered d is still identical on
every rank). DB-MTL's EMA is per coordinate (its K × N buffer is sharded too: each rank's ``state_dict``
holds its own columns and says whose, so save and load it per rank: a rank holding another's raises at the
consistency check), but its α_i = max_j ‖B_j‖ / ‖B_i‖ needs the global norms: their squares are
all-reduced (8 K bytes) and the shard is recombined, so DB-MTL equals the single-process result.

**With DistributedDataParallel**: run the forward and ``flatmtl_fast.backward(..., process_group=...)`` inside
``ddp.no_sync()`` (or train the plain module, not the DDP wrapper): DDP's own all-reduce of ``.grad`` then does
not run, the per-task gradients stay per-rank, and the step's reduce-scatter does the averaging. Outside
``no_sync`` DDP's reducer runs too (it expects one backward pass per forward): in our test it all-reduced the
parameters' gradients once per step, during one of the task passes, on top of the step's own collectives. The
step then averages those already averaged rows again, so ``.grad`` came out the same, but nothing detects the
waste of N values of traffic per step: use ``no_sync``.

**F-MTL** (``FMTL(..., process_group=...)``, replicated): every rank must perturb by the ε_i of the whole batch,
so the clean g_i are all-reduced (K N b) before the perturbed passes; the step then takes the 2K rows [g; h] with
``averaged_rows=K``: only the K rows h_i are reduce-scattered, the g rows' shard is a local slice. One rank sends
≈ (P−1)/P · (3K + 1) N b per step (ring), against (P−1)/P · 4K N b for an all-reduce of [g; h] (and
(4K + 1) N b if the averaged g rows were reduce-scattered again). The FMTL docstring lists every term. Sharded
(tensor parallel, FSDP2, HSDP): each rank perturbs its own slice, and only the squared norms (2K numbers: the
shared slices' and the heads' shards') join the Gram's all-reduce.

Timeouts: a rank that raises or exits mid-step leaves the others waiting in a collective until the process
group's timeout (``init_process_group(timeout=...)``); gloo then raises, turned into a
:class:`DistributedStepError` on every waiting rank. NCCL enforces its timeout in its watchdog thread, which by
default aborts the communicator and the process (``TORCH_NCCL_ASYNC_ERROR_HANDLING``).
"""

from .aggregate import LAYOUTS, Aggregation, DistributedStep, Layout, aggregate
from .traffic import DistributedStepError, Traffic

__all__ = ["LAYOUTS", "Aggregation", "DistributedStep", "DistributedStepError", "Layout", "Traffic", "aggregate"]
