"""MQTT output: store-and-forward through a broker outage in the real daemon loop, throughput, cost to inspection.

    python benchmarks/mqtt_output.py --bundle BUNDLE [--copies 3] [--rounds 2] [--records 3000]
    python benchmarks/mqtt_output.py --two-lines [--records 3000]

Needs Debian's `mosquitto` (started here on a free 127.0.0.1 port, as the tests do) and paho-mqtt. Three parts:
  outage      the daemon (Station: folder replay of the bottle test images x --copies -> pipeline -> result log +
              MQTT) with the broker hung (SIGSTOP) and killed (SIGKILL) after a third of the frames and restarted
              on the same port after two thirds; a historian (persistent session, QoS 1) counts what arrives.
              Reported: records inspected (result log) vs published (distinct frame ids received), in order,
              duplicates (QoS 1), most records queued in the outbox while down, delivery delay (arrival - record
              time) of the records made while the broker was down, and the time to drain after the restart.
  inspection  the same run without MQTT and with MQTT (broker up), --rounds each, interleaved: p50/p95 of the
              pipeline total and frames per second of the loop (which includes driving the outputs).
  throughput  MqttOutput alone: --records records published back to back until all are acknowledged (live), and
              a backlog of --records queued while the broker is down, drained after it starts (timed from the reconnect).
Writes benchmarks/results/mqtt_output.json and .md.

--two-lines (no bundle): the station's shared connection (edge_runtime/outputs/mqtt_station.py), two lines'
adapters fed by two producer threads at once, --records per line, against one line on its own connection with the
same total and two lines on two connections (the layout before the shared one); records/s until all are
acknowledged, CPU of this process per record, and per line: in order and complete at a subscriber.
Writes benchmarks/results/mqtt_two_lines.json and .md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_report import BOTTLE, LoadMonitor, add_results_option, md_table, median, percentile, write_results  # noqa: E402

from edge_runtime.config import load_station  # noqa: E402
from edge_runtime.daemon import Station  # noqa: E402
from edge_runtime.outputs import MqttConfig, MqttOutput  # noqa: E402
from edge_runtime.outputs.mqtt_station import StationMqtt, StationMqttConfig  # noqa: E402
from edge_runtime.records import InspectionResult, Verdict  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("mosquitto_broker", REPO / "tests" / "fixtures" / "mosquitto_broker.py")
mb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mb)

PREFIX = "bench/plant/line/station"
RESULT = f"{PREFIX}/result"


def flatten_images(data: Path, dest: Path, copies: int) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in (data / "test").rglob("*.png"))
    n = 0
    for c in range(copies):
        for p in files:
            shutil.copyfile(p, dest / f"{c}_{p.parent.name}_{p.name}")
            n += 1
    return n


def station_file(work: Path, bundle: Path, images: Path, port: int | None, tag: str) -> Path:
    import yaml

    outputs = [{"type": "result_log", "path": str(work / f"{tag}.jsonl")}]
    if port is not None:
        outputs.append({"type": "mqtt", "host": "127.0.0.1", "port": port, "topic_prefix": PREFIX,
                        "outbox": str(work / f"{tag}.outbox.sqlite"), "reconnect_min_s": 0.2, "reconnect_max_s": 1.0,
                        "close_timeout_s": 30.0})
    path = work / f"{tag}.yaml"
    path.write_text(yaml.safe_dump({"name": tag, "bundle": str(bundle), "source": {"type": "folder", "path": str(images)},
                                    "outputs": outputs, "http": {"enabled": False}, "state_dir": str(work / f"{tag}.state"),
                                    "logging": {"stats_interval_s": 3600}}))
    return path


def run_station(path: Path, on_frame=None) -> tuple[list[dict], float, Station]:
    station = Station(load_station(path))
    done = threading.Event()
    watcher = None
    if on_frame is not None:
        def watch():
            while not done.is_set():
                on_frame(station)
                time.sleep(0.01)
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
    t0 = time.perf_counter()
    rc = station.run()
    wall = time.perf_counter() - t0
    done.set()
    if watcher is not None:
        watcher.join()
    assert rc == 0, rc
    log = [json.loads(line) for line in Path(station.cfg.outputs[0].path).read_text().splitlines()]
    return log, wall, station


def latency_row(name: str, log: list[dict], wall: float) -> dict:
    totals = [r["latency_ms"]["total"] for r in log if r["verdict"] != "FAULT"]
    return {"run": name, "frames": len(log), "p50_ms": median(totals), "p95_ms": percentile(totals, 95),
            "frames_per_s": len(log) / wall}


def outage(work: Path, bundle: Path, images: Path, n_frames: int) -> dict:
    broker = mb.Broker(work / "broker-outage").start()
    sub = mb.Subscriber(broker.port, [RESULT], client_id="historian", persistent=True)
    broker.save()
    path = station_file(work, bundle, images, broker.port, "outage")
    events: dict[str, float] = {}
    queued: list[tuple[float, int]] = []

    def on_frame(station: Station) -> None:
        out = next(o for o in station.outputs if isinstance(o, MqttOutput))
        frames = station.counters.frames
        if "down" not in events and frames >= n_frames // 3:
            broker.pause()
            time.sleep(0.5)          # what the broker had already sent reaches the historian
            broker.kill()
            events["down"] = time.time()
        elif "down" in events and "up" not in events:
            queued.append((time.time(), out.queued()))
            if frames >= 2 * n_frames // 3:
                broker.start()
                events["up"] = time.time()
        elif "up" in events and "drained" not in events:
            queued.append((time.time(), out.queued()))
            if out.queued() == 0:
                events["drained"] = time.time()

    try:
        log, wall, station = run_station(path, on_frame)
        out = next(o for o in station.outputs if isinstance(o, MqttOutput))
        sub.wait_for(lambda s: len({r["frame_id"] for r in s.records(RESULT)}) >= len(log), timeout=60)
        received = sub.records(RESULT)
        arrivals = [t for topic, _, t, _ in sub.messages if topic == RESULT]
    finally:
        sub.close()
        broker.stop()
    ids = [r["frame_id"] for r in received]
    kept, duplicates, out_of_order = mb.dedupe_in_order(ids)
    logged_ids = [r["frame_id"] for r in log]
    first_arrival: dict[int, float] = {}
    for r, t in zip(received, arrivals):
        first_arrival.setdefault(r["frame_id"], t)
    made_down = [r for r in log if events["down"] <= r["time"] < events["up"]]
    delays_down = [first_arrival[r["frame_id"]] - r["time"] for r in made_down if r["frame_id"] in first_arrival]
    delays_up = [first_arrival[r["frame_id"]] - r["time"] for r in log
                 if r["time"] < events["down"] - 1.0 and r["frame_id"] in first_arrival]
    return {
        "inspected": len(log), "published_distinct": len(set(ids)), "received_messages": len(ids),
        "in_order_and_complete": kept == logged_ids, "duplicates": duplicates, "out_of_order": out_of_order,
        "broker_down_s": events["up"] - events["down"], "records_made_while_down": len(made_down),
        "outbox_max_queued": max((q for _, q in queued), default=0),
        "drain_after_restart_s": events.get("drained", float("nan")) - events["up"],
        "delay_while_down_s": {"p50": median(delays_down), "max": max(delays_down)} if delays_down else None,
        "delay_broker_up_ms": {"p50": median(delays_up) * 1000, "p95": percentile(delays_up, 95) * 1000}
        if delays_up else None,
        "counters": out.counters(), "station_wall_s": wall,
    }


def throughput(work: Path, n: int) -> dict:
    def make(i: int) -> InspectionResult:
        return InspectionResult(frame_id=i, source="bench", verdict=Verdict.OK, score=12.3, normalized_score=0.3,
                                threshold=24.5, timings_ms={"decode": 1.0, "features": 20.0, "total": 30.0},
                                bundle_id="b", captured_at=time.time())

    rows = {}
    for fsync in (True, False):
        broker = mb.Broker(work / f"broker-tp-{fsync}").start()
        out = MqttOutput(MqttConfig(host="127.0.0.1", port=broker.port, topic_prefix=PREFIX, outbox_fsync=fsync,
                                    outbox=str(work / f"tp-{fsync}.sqlite"), reconnect_min_s=0.1, reconnect_max_s=0.2))
        out.start()
        try:
            deadline = time.monotonic() + 10
            while not out._connected and time.monotonic() < deadline:
                time.sleep(0.01)
            t0, cpu0 = time.perf_counter(), time.process_time()
            for i in range(n):
                out.publish(make(i))
            publish_call_s = time.perf_counter() - t0
            while out.published < n:
                time.sleep(0.005)
            live = n / (time.perf_counter() - t0)
            # CPU time of this process (writer + sender + paho threads) per record: unlike wall time, it does not
            # depend on what else runs on the machine; it is what MQTT takes from the inspection's cores.
            cpu_per_record_us = (time.process_time() - cpu0) / n * 1e6
            # Backlog: the broker goes away, n records queue on disk, the broker comes back and they drain.
            broker.stop()
            for i in range(n, 2 * n):
                out.publish(make(i))
            out.wait_committed(60)
            broker.start()
            while not out._connected:   # the drain rate, not the reconnect backoff
                time.sleep(0.002)
            t1 = time.perf_counter()
            while out.published < 2 * n:
                time.sleep(0.005)
            drain = n / (time.perf_counter() - t1)
        finally:
            out.close()
            broker.stop()
        rows[f"fsync={fsync}"] = {"records": n, "live_records_per_s": live, "backlog_drain_records_per_s": drain,
                                  "publish_call_us": publish_call_s / n * 1e6, "cpu_per_record_us": cpu_per_record_us}
    return rows


def _bench_result(i: int) -> InspectionResult:
    return InspectionResult(frame_id=i, source="bench", verdict=Verdict.OK, score=12.3, normalized_score=0.3,
                            threshold=24.5, timings_ms={"decode": 1.0, "features": 20.0, "total": 30.0},
                            bundle_id="b", captured_at=time.time())


def two_lines(work: Path, n: int) -> dict:
    """Records/s and CPU per record: 2 lines on the station's one connection vs 1 line vs 2 lines x 2 connections."""
    rows = {}
    for layout in ("1 line, 1 connection", "2 lines, 1 shared connection", "2 lines, 2 connections"):
        broker = mb.Broker(work / f"broker-2l-{len(rows)}").start()
        sub = mb.Subscriber(broker.port, [f"{PREFIX}/#"], client_id="historian", persistent=False)
        common = dict(host="127.0.0.1", port=broker.port, reconnect_min_s=0.1, reconnect_max_s=0.2)
        shared = None
        if layout.startswith("1 line"):
            outs = [MqttOutput(MqttConfig(topic_prefix=PREFIX, outbox=str(work / "2l-single.sqlite"), **common))]
            sinks, topics, per_sink = outs, [RESULT], 2 * n
            owners = outs
        elif "shared" in layout:
            shared = StationMqtt(StationMqttConfig(topic_prefix=PREFIX, outbox=str(work / "2l-shared.sqlite"),
                                                   **common), ["left", "right"])
            sinks = [shared.adapter("left"), shared.adapter("right")]
            topics, per_sink, owners = [f"{PREFIX}/left/result", f"{PREFIX}/right/result"], n, [shared]
        else:   # what a station did before the shared connection: one MqttOutput (client, outbox) per line
            sinks = [MqttOutput(MqttConfig(topic_prefix=f"{PREFIX}/{name}", outbox=str(work / f"2l-{name}.sqlite"),
                                           **common)) for name in ("left", "right")]
            topics, per_sink, owners = [f"{PREFIX}/left/result", f"{PREFIX}/right/result"], n, sinks
        for out in sinks:
            out.start()
        try:
            deadline = time.monotonic() + 10
            while not all(o._connected for o in owners) and time.monotonic() < deadline:
                time.sleep(0.01)
            total = per_sink * len(sinks)
            t0, cpu0 = time.perf_counter(), time.process_time()
            producers = [threading.Thread(target=lambda o=o: [o.publish(_bench_result(i)) for i in range(per_sink)])
                         for o in sinks]
            for t in producers:
                t.start()
            for t in producers:
                t.join()
            while sum(o.published for o in owners) < total:
                time.sleep(0.002)
            wall = time.perf_counter() - t0
            cpu_us = (time.process_time() - cpu0) / total * 1e6
            complete = sub.wait_for(lambda s: all(len(s.payloads(t)) >= per_sink for t in topics), timeout=60)
            in_order = complete and all(mb.dedupe_in_order([r["frame_id"] for r in sub.records(t)])[0]
                                        == list(range(per_sink)) for t in topics)
            connections = len(owners)
        finally:
            for out in sinks:
                out.close()
            sub.close()
            broker.stop()
        rows[layout] = {"lines": len(topics), "connections": connections, "records": total,
                        "records_per_s": total / wall, "cpu_per_record_us": cpu_us, "in_order_per_line": in_order}
    return rows


def main_two_lines(args) -> int:
    load = LoadMonitor()
    with tempfile.TemporaryDirectory(prefix="mqtt_bench_2l_") as tmp:
        rows = two_lines(Path(tmp), args.records)
    load_info = load.stop()
    body = (f"QoS 1, local Mosquitto, outbox fsync on; {args.records} records per line from one producer thread "
            "per line (the single line gets both lines' total); timed until the broker acknowledged every record.\n\n")
    body += md_table(["layout", "connections", "records", "records/s", "CPU per record us", "in order per line"],
                     [[k, v["connections"], v["records"], v["records_per_s"], v["cpu_per_record_us"],
                       v["in_order_per_line"]] for k, v in rows.items()])
    write_results("mqtt_two_lines", "MQTT: two lines on the station's one connection", body,
                  {"layouts": rows, "records_per_line": args.records}, load_info, out_dir=args.results_dir)
    return 0 if all(v["in_order_per_line"] for v in rows.values()) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, default=None, help="bundle directory (required unless --two-lines; "
                   "default none; e.g. edge-export fit of bottle with the defaults)")
    p.add_argument("--two-lines", action="store_true", help="only the shared-connection benchmark of two lines "
                   "(no bundle needed; default off)")
    p.add_argument("--data", type=Path, default=BOTTLE, help=f"MVTec-style category folder (default {BOTTLE})")
    p.add_argument("--copies", type=int, default=3, help="each test image this many times per run (default 3)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved runs with and without MQTT (default 2)")
    p.add_argument("--records", type=int, default=3000, help="records for the throughput part (default 3000)")
    add_results_option(p)
    from bench_report import state_defaults   # every option's help states its default
    args = state_defaults(p).parse_args(argv)
    if args.two_lines:
        return main_two_lines(args)
    if args.bundle is None:
        p.error("--bundle is required (unless --two-lines)")
    load = LoadMonitor()
    with tempfile.TemporaryDirectory(prefix="mqtt_bench_") as tmp:
        work = Path(tmp)
        images = work / "images"
        n_frames = flatten_images(args.data, images, args.copies)
        broker = mb.Broker(work / "broker").start()
        runs = []
        try:
            for r in range(args.rounds):
                for with_mqtt in (False, True):
                    tag = f"{'mqtt' if with_mqtt else 'plain'}{r}"
                    log, wall, _ = run_station(station_file(work, args.bundle, images,
                                                            broker.port if with_mqtt else None, tag))
                    runs.append(latency_row(tag, log, wall))
        finally:
            broker.stop()
        out = outage(work, args.bundle, images, n_frames)
        tp = throughput(work, args.records)
    load_info = load.stop()

    def pooled(prefix: str) -> dict:
        rows = [r for r in runs if r["run"].startswith(prefix)]
        return {"p50_ms": median([r["p50_ms"] for r in rows]), "frames_per_s": median([r["frames_per_s"] for r in rows])}

    plain, mqtt = pooled("plain"), pooled("mqtt")
    body = "## Broker outage during a run (hung, killed, restarted)\n\n" + md_table(
        ["inspected", "published (distinct)", "messages", "in order, complete", "duplicates", "broker down s",
         "made while down", "outbox max", "delay while down p50 / max s", "drain after restart s",
         "delay broker up p50 / p95 ms"],
        [[out["inspected"], out["published_distinct"], out["received_messages"], out["in_order_and_complete"],
          out["duplicates"], out["broker_down_s"], out["records_made_while_down"], out["outbox_max_queued"],
          f"{out['delay_while_down_s']['p50']:.2f} / {out['delay_while_down_s']['max']:.2f}" if out["delay_while_down_s"] else "-",
          out["drain_after_restart_s"],
          f"{out['delay_broker_up_ms']['p50']:.1f} / {out['delay_broker_up_ms']['p95']:.1f}" if out["delay_broker_up_ms"] else "-"]])
    body += "\n\n## Inspection with and without MQTT (interleaved runs)\n\n" + md_table(
        ["run", "frames", "p50 ms", "p95 ms", "frames/s"],
        [[r["run"], r["frames"], r["p50_ms"], r["p95_ms"], r["frames_per_s"]] for r in runs])
    body += (f"\n\nMedian over rounds: p50 {plain['p50_ms']:.1f} ms without MQTT, {mqtt['p50_ms']:.1f} ms with; "
             f"{plain['frames_per_s']:.1f} vs {mqtt['frames_per_s']:.1f} frames/s.\n")
    body += "\n## MqttOutput throughput (QoS 1, local broker)\n\n" + md_table(
        ["outbox", "records", "live records/s", "backlog drain records/s", "publish() call us",
         "daemon CPU per record us"],
        [[k, v["records"], v["live_records_per_s"], v["backlog_drain_records_per_s"], v["publish_call_us"],
          v["cpu_per_record_us"]] for k, v in tp.items()])
    write_results("mqtt_output", "MQTT output: outage, inspection cost, throughput", body,
                  {"outage": out, "inspection_runs": runs, "inspection_median": {"plain": plain, "mqtt": mqtt},
                   "throughput": tp, "bundle": str(args.bundle), "frames_per_run": n_frames},
                  load_info, out_dir=args.results_dir)
    return 0 if out["in_order_and_complete"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
