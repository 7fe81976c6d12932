"""The daemon with its OPC UA server, driven by an asyncua client: StartSingleJob fires the software trigger, the part
is inspected, LastResult and the ResultReady event carry the result-log record's frame id, verdict and bundle."""
from __future__ import annotations

import asyncio
import shutil
import time

from extras import require

require("asyncua", "opcua")

from asyncua import Client  # noqa: E402

from edge_runtime.config import load_station
from edge_runtime.outputs import OpcUaServer
from edge_runtime.outputs.opcua_server import NAMESPACE_URI


class Events:
    def __init__(self) -> None:
        self.events = []

    def event_notification(self, event) -> None:
        self.events.append(event)


def test_single_job_over_opcua_inspects_one_part_and_reports_it(device_bundle, tmp_path, write_station,
                                                               start_station, read_log):
    images = tmp_path / "images"
    images.mkdir()
    for i, g in enumerate(sorted((device_bundle / "golden").glob("*.png"))):
        shutil.copyfile(g, images / f"part_{i}.png")
    cfg = load_station(write_station(
        bundle=device_bundle, source={"type": "folder", "path": str(images)}, trigger={"type": "software"},
        recovery={"exit_when_exhausted": False, "read_timeout_s": 0.2},
        outputs=[{"type": "result_log", "path": "results.jsonl"},
                 {"type": "opcua", "port": 0, "allow_trigger": True, "state_interval_s": 0.2}]))
    running = start_station(cfg)
    server = next(o for o in running.station.outputs if isinstance(o, OpcUaServer))
    deadline = time.monotonic() + 60
    while server.port is None and time.monotonic() < deadline:
        time.sleep(0.05)

    async def scenario():
        async with Client(f"opc.tcp://127.0.0.1:{server.port}/patchcore-edge/") as client:
            idx = await client.get_namespace_index(NAMESPACE_URI)
            vs = await client.nodes.objects.get_child([f"{idx}:VisionSystem"])
            state = await vs.get_child([f"{idx}:VisionSystemState"])
            end = time.monotonic() + 60
            while await state.read_value() != "Operational" and time.monotonic() < end:
                await asyncio.sleep(0.1)
            assert await state.read_value() == "Operational"
            version = await vs.get_child([f"{idx}:ActiveRecipe", f"{idx}:BundleVersion"])
            assert await version.read_value() == 1
            events = Events()
            sub = await client.create_subscription(50, events)
            etype = await client.nodes.base_event_type.get_child(f"{idx}:ResultReadyEventType")
            await sub.subscribe_events(vs, etype)
            await asyncio.sleep(0.3)
            assert await vs.call_method(f"{idx}:StartSingleJob") is True
            end = time.monotonic() + 60
            while not events.events and time.monotonic() < end:
                await asyncio.sleep(0.05)
            frame = await (await vs.get_child([f"{idx}:LastResult", f"{idx}:FrameId"])).read_value()
            verdict = await (await vs.get_child([f"{idx}:LastResult", f"{idx}:Verdict"])).read_value()
            return events.events, frame, verdict

    events, frame, verdict = asyncio.run(scenario())
    running.stop()
    logged = read_log(tmp_path / "results.jsonl")
    assert len(logged) == 1                                   # one job, one part
    assert (frame, verdict) == (logged[0]["frame_id"], logged[0]["verdict"])
    assert [(e.FrameId, e.Verdict, e.BundleId) for e in events] == \
        [(logged[0]["frame_id"], logged[0]["verdict"], logged[0]["bundle_id"])]
