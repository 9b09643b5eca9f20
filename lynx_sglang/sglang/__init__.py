"""The SGLang integration: the only package of lynx-sglang that imports ``sglang``.

Modules, one job each:
- ``plugin``: the ``sglang.srt.plugins`` entry point; one table of every hook, registered once.
- ``hooks``: the hooked functions (start-up checks, step scope, TopK selection, FusedMoE wrap).
- ``runtime``: per-process state (config, current step, selection stats, store + expert cache).
- ``routing``: Lynx selection applied to a TopK output.
- ``moe_method``: the quant-method wrapper that serves a FusedMoE from K GPU slots.
- ``checks``: supported configurations; ``args``: the launcher's flags; ``metrics``: counters out.

How a decode step is recognised: ``ModelRunner._forward_raw`` (every eager forward and every
graph replay goes through it) scopes the forward as a decode step when
``forward_batch.forward_mode.is_decode()``, with one real row per request, and writes that count
into a 0-dim device buffer; ``DecodeCudaGraphRunner.capture_one_shape`` scopes a decode capture
with that buffer as ``num_valid``, so a replayed graph masks its padding rows without a host read.
Prefill, extend, mixed, idle and verify forwards are never touched.
"""
