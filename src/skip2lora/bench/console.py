"""What the benchmark prints while it runs: one section per configuration, then the comparison summary."""

from __future__ import annotations

RULE = "=" * 96


def print_config_section(index: int, count: int, config: dict) -> None:
    print(RULE)
    baseline = "  [baseline]" if config.get("is_baseline") else ""
    print(f"[{index}/{count}] {config['name']}: {config['label']}{baseline}")
    print(RULE)
    if config["status"] != "ok":
        print(f"FAILED after {config['wall_s']:.1f}s: {config['error']}\n", flush=True)
        return
    p = config["parameters"]
    adapter = "-" if p["adapter"] is None else f"{p['adapter']:,}"
    print(f"Parameters : total {p['total']:,} | trainable {p['trainable']:,} ({100 * p['trainable_ratio']:.3f}%) "
          f"| adapter {adapter}" + (f" | weights {p['weights_mb']:.1f} MB as stored" if p.get("weights_mb") else ""))
    for phase in ("forward", "backward", "optimizer", "step"):
        t, label = config["timing"][phase], phase.capitalize()
        print(f"{label:<11}: mean {t['mean_ms']:.2f} ms | min {t['min_ms']:.2f} | max {t['max_ms']:.2f} "
              f"| std {t['std_ms']:.2f}")
    m = config["memory"]
    what = "peak allocated" if m["kind"] == "cuda_allocated" else "peak RSS"
    extra = f" | peak reserved {m['peak_reserved_mb']:.1f} MB" if "peak_reserved_mb" in m else ""
    print(f"Memory     : {what} {m['peak_mb']:.1f} MB ({m['peak_above_baseline_mb']:+.1f} MB over "
          f"{m['baseline_mb']:.1f} MB after load); timed iterations alone {m['last_interval_peak_mb']:.1f} MB{extra}")
    cache = config.get("cache")
    if cache:
        rate = "-" if cache["hit_rate"] is None else f"{100 * cache['hit_rate']:.1f}%"
        print(f"Skip-Cache : hit rate while timed {rate} ({cache['hits']} hits, {cache['misses']} misses); "
              f"{cache['samples']} rows cached, {cache['size_mb']:.2f} MB")
    parts = config.get("forward_parts_ms")
    if parts:
        print("Fwd parts  : " + " | ".join(f"{name} {ms:.2f} ms" for name, ms in parts.items()))
    floor = config.get("head_floor_ms")
    if floor:
        print(f"Floor      : frozen head + loss over the loss positions alone {floor:.2f} ms; the whole step is "
              f"{config['timing']['step']['mean_ms'] / floor:.2f}x that")
    loss = config["loss"]
    print(f"Throughput : {config['tokens_per_s']:,.0f} tokens/s; {config['loss_tokens_per_batch']:.0f} loss tokens "
          f"of {config['tokens_per_batch']} per batch; loss {loss['first']:.4f} -> {loss['last']:.4f}")
    print(f"Process    : model built in {config['load_s']:.1f}s, worker {config['wall_s']:.1f}s in all, "
          f"{config['threads']} threads\n", flush=True)


def print_summary(result: dict) -> None:
    from ..report.bench_report import comparison_tables, epoch_table
    from ..report.tables import render_text

    shapes, env = result["shapes"], result["environment"]
    print(RULE)
    print("COMPARISON SUMMARY")
    print(RULE)
    print(f"model {result['model']['name']} | batch {shapes['batch_size']} x {shapes['seq_len']} tokens | "
          f"{shapes['warmup']} warm-up + {shapes['iters']} timed iterations | {env['device']}: {env['device_name']} "
          f"({env['threads']} threads) | precision {shapes['precision']}"
          + (f" | {shapes['busy_processes']} busy process(es) beside each worker" if shapes.get("busy_processes") else "")
          + "\n")
    for table in comparison_tables(result):
        print(render_text(table) + "\n")
    epochs = epoch_table(result)
    if epochs:
        print(render_text(epochs) + "\n")
