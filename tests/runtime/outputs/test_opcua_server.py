"""OpcUaServer read and driven by a real asyncua client on 127.0.0.1: state, last result, counters, the result-ready
event and StartSingleJob (refused unless allowed, ready and software-triggered)."""
from __future__ import annotations

import asyncio
import time

import pytest
from asyncua import Client, ua

from edge_runtime.outputs import OpcUaConfig, OpcUaServer
from edge_runtime.outputs.opcua_server import NAMESPACE_URI
from edge_runtime.records import InspectionResult, Verdict


def make_result(frame_id: int, verdict: Verdict, score: float | None = 30.5) -> InspectionResult:
    return InspectionResult(frame_id=frame_id, source="cam0", verdict=verdict, score=score,
                            normalized_score=None if score is None else 0.7, threshold=24.5, timings_ms={},
                            bundle_id="bundle-7", error=None if score is not None else "decode: bad file")


@pytest.fixture
def server():
    fired = []
    out = OpcUaServer(OpcUaConfig(port=0, allow_trigger=True, state_interval_s=0.2))
    out.bind_state(lambda: {"bundle_id": "bundle-7", "bundle_version": 12, "frames": 2,
                            "verdicts": {"OK": 1, "NG": 1, "REVIEW": 0, "FAULT": 0}})
    out.bind_trigger(lambda: fired.append(time.monotonic()))
    out.start()
    out.fired = fired
    yield out
    out.close()


async def browse(client: Client, *path: str):
    idx = await client.get_namespace_index(NAMESPACE_URI)
    return await client.nodes.objects.get_child([f"{idx}:{p}" for p in path])


async def wait_value(node, expected, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = await node.read_value()
        if value == expected or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.05)


class EventCollector:
    def __init__(self) -> None:
        self.events = []

    def event_notification(self, event) -> None:
        self.events.append(event)


def test_state_result_counters_event_and_single_job(server):
    async def scenario():
        async with Client(f"opc.tcp://127.0.0.1:{server.port}/patchcore-edge/") as client:
            vs = await browse(client, "VisionSystem")
            assert await (await browse(client, "VisionSystem", "VisionSystemState")).read_value() == "Preoperational"
            # A job while not ready would only be answered FAULT: refused with BadInvalidState.
            with pytest.raises(ua.UaStatusCodeError) as err:
                await vs.call_method(f"{vs.nodeid.NamespaceIndex}:StartSingleJob")
            assert err.value.code == ua.StatusCodes.BadInvalidState
            server.set_fault(None)
            server.set_ready(True)
            state = await browse(client, "VisionSystem", "VisionSystemState")
            assert await wait_value(state, "Operational") == "Operational"
            assert await (await browse(client, "VisionSystem", "ActiveRecipe", "BundleVersion")).read_value() == 12
            assert await (await browse(client, "VisionSystem", "Counters", "NG")).read_value() == 1

            collector = EventCollector()
            sub = await client.create_subscription(50, collector)
            etype = await client.nodes.base_event_type.get_child(
                f"{await client.get_namespace_index(NAMESPACE_URI)}:ResultReadyEventType")
            await sub.subscribe_events(vs, etype)
            await asyncio.sleep(0.3)
            assert await vs.call_method(f"{vs.nodeid.NamespaceIndex}:StartSingleJob") is True
            assert len(server.fired) == 1
            server.publish(make_result(41, Verdict.NG))
            server.publish(make_result(42, Verdict.FAULT, score=None))
            frame = await browse(client, "VisionSystem", "LastResult", "FrameId")
            assert await wait_value(frame, 42) == 42
            assert await (await browse(client, "VisionSystem", "LastResult", "Verdict")).read_value() == "FAULT"
            assert await (await browse(client, "VisionSystem", "LastResult", "IsPass")).read_value() is False
            assert await (await browse(client, "VisionSystem", "LastResult", "Error")).read_value() == "decode: bad file"
            deadline = time.monotonic() + 10
            while len(collector.events) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            got = [(e.FrameId, e.Verdict, e.IsPass, e.BundleId) for e in collector.events]
            assert got == [(41, "NG", False, "bundle-7"), (42, "FAULT", False, "bundle-7")]
            server.set_fault("source: camera lost")
            assert await wait_value(state, "Error") == "Error"
            reason = await browse(client, "VisionSystem", "Reason")
            assert await wait_value(reason, "source: camera lost") == "source: camera lost"

    asyncio.run(scenario())
    assert server.counters() == {"opcua_events": 2, "opcua_jobs_started": 1}


def test_single_job_is_refused_unless_allowed():
    out = OpcUaServer(OpcUaConfig(port=0))
    out.bind_trigger(lambda: None)
    out.start()
    try:
        out.set_fault(None)
        out.set_ready(True)

        async def call():
            async with Client(f"opc.tcp://127.0.0.1:{out.port}/patchcore-edge/") as client:
                vs = await browse(client, "VisionSystem")
                with pytest.raises(ua.UaStatusCodeError) as err:
                    await vs.call_method(f"{vs.nodeid.NamespaceIndex}:StartSingleJob")
                return err.value.code

        assert asyncio.run(call()) == ua.StatusCodes.BadUserAccessDenied
    finally:
        out.close()


def test_default_config_is_loopback_and_trigger_off():
    cfg = OpcUaConfig()
    assert (cfg.host, cfg.port, cfg.allow_trigger) == ("127.0.0.1", 4840, False)


def test_an_exposed_server_is_warned_about():
    assert OpcUaConfig().warnings() == []
    found = OpcUaConfig(host="0.0.0.0", allow_trigger=True).warnings()
    assert "no user authentication or encryption" in found[0] and found[1].startswith("allow_trigger:")
