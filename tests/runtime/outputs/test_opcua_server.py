"""OpcUaServer read and driven by a real asyncua client on 127.0.0.1: state, last result, counters, the result-ready
event and StartSingleJob (refused unless allowed, ready and software-triggered)."""
from __future__ import annotations

import asyncio
import time

import pytest
from extras import require

require("asyncua", "opcua")

from asyncua import Client, ua  # noqa: E402

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
            # A trigger refused for its backlog (SoftwareTrigger.fire False) is not a started job (probe 47).
            server.bind_trigger(lambda: False)
            with pytest.raises(ua.UaStatusCodeError) as err:
                await vs.call_method(f"{vs.nodeid.NamespaceIndex}:StartSingleJob")
            assert err.value.code == ua.StatusCodes.BadTooManyOperations
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


def test_last_result_shows_no_pass_from_a_trigger_to_its_result_or_while_not_ready(server):
    """Probe 37: right after StartSingleJob, 8 of 16 reads of LastResult showed the previous part's IsPass True;
    through a stall IsPass stayed True. IsPass is withdrawn before StartSingleJob returns, when the bus says a
    part begins or was triggered elsewhere, and whenever the station is not ready."""
    async def scenario():
        async with Client(f"opc.tcp://127.0.0.1:{server.port}/patchcore-edge/") as client:
            vs = await browse(client, "VisionSystem")
            is_pass = await browse(client, "VisionSystem", "LastResult", "IsPass")
            verdict = await browse(client, "VisionSystem", "LastResult", "Verdict")
            server.set_fault(None)
            server.set_ready(True)
            assert await wait_value(await browse(client, "VisionSystem", "StationState"), "ready") == "ready"
            server.publish(make_result(7, Verdict.OK, score=10.0))
            assert await wait_value(is_pass, True) is True
            assert await vs.call_method(f"{vs.nodeid.NamespaceIndex}:StartSingleJob") is True
            assert await is_pass.read_value() is False and await verdict.read_value() == "", \
                "the previous part's OK was readable after the trigger"
            server.publish(make_result(8, Verdict.OK, score=10.0))
            assert await wait_value(is_pass, True) is True
            server.verdict_withdrawn()                 # a serial TRG or POST /trigger, through the output bus
            assert await wait_value(is_pass, False) is False
            server.publish(make_result(9, Verdict.OK, score=10.0))
            assert await wait_value(is_pass, True) is True
            server.set_fault("inspection stalled: the current frame has been in inspection for 2.5 s")
            assert await wait_value(is_pass, False) is False
            assert await verdict.read_value() == "OK", "the last verdict stays readable as history"

    asyncio.run(scenario())


def test_reads_do_not_log_a_line_each(server, caplog):
    """A client polling the server is no log volume (probe 78: every Read was an asyncua INFO line)."""
    import logging

    caplog.set_level(logging.INFO)

    async def scenario():
        async with Client(f"opc.tcp://127.0.0.1:{server.port}/patchcore-edge/") as client:
            state = await browse(client, "VisionSystem", "StationState")
            for _ in range(50):
                await state.read_value()

    asyncio.run(scenario())
    chatter = [r for r in caplog.records if r.name.startswith("asyncua") and r.levelno < logging.WARNING]
    assert len(chatter) == 0


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


# ---- security: policies, certificates, trusted clients, users --------------------------------------------------

def _make_cert(folder, name: str, uri: str):
    """A throwaway self-signed application certificate and key, made at test time (never committed)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import ExtendedKeyUsageOID
    from asyncua.crypto.cert_gen import (dump_private_key_as_pem, generate_private_key,
                                         generate_self_signed_app_certificate)

    key = generate_private_key()
    cert = generate_self_signed_app_certificate(
        key, name, {"organizationName": "patchcore-edge tests"},
        [x509.UniformResourceIdentifier(uri), x509.DNSName("localhost")],
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], days=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.der").write_bytes(cert.public_bytes(Encoding.DER))
    (folder / f"{name}.pem").write_bytes(dump_private_key_as_pem(key))
    return folder / f"{name}.der", folder / f"{name}.pem"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    server = _make_cert(root / "server", "station", "urn:freeopcua:python:server")
    client = _make_cert(root / "client", "scada", "urn:freeopcua:client")
    stranger = _make_cert(root / "stranger", "stranger", "urn:freeopcua:client")
    trusted = root / "trusted"
    trusted.mkdir()
    (trusted / "scada.der").write_bytes(client[0].read_bytes())
    return {"server": server, "client": client, "stranger": stranger, "trusted": trusted}


def secure_server(pki, policy: str, **kw) -> OpcUaServer:
    cfg = OpcUaConfig(port=0, state_interval_s=0.2, security_policy=policy, certificate=str(pki["server"][0]),
                      private_key=str(pki["server"][1]), **kw)
    cfg.validate()
    out = OpcUaServer(cfg)
    out.start()
    out.set_fault(None)
    out.set_ready(True)
    out.publish(make_result(41, Verdict.NG))
    return out


async def read_frame_id(port: int, cert=None, mode=None, user: tuple[str, str] | None = None) -> int:
    from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

    client = Client(f"opc.tcp://127.0.0.1:{port}/patchcore-edge/", timeout=5)
    if cert is not None:
        await client.set_security(SecurityPolicyBasic256Sha256, str(cert[0]), str(cert[1]), mode=mode)
    if user is not None:
        client.set_user(user[0])
        client.set_password(user[1])
    async with client:
        node = await browse(client, "VisionSystem", "LastResult", "FrameId")
        return await wait_value(node, 41)


@pytest.mark.parametrize("policy, mode", [("Basic256Sha256_SignAndEncrypt", ua.MessageSecurityMode.SignAndEncrypt),
                                          ("Basic256Sha256_Sign", ua.MessageSecurityMode.Sign)])
def test_a_client_with_the_policy_reads_and_a_policy_none_client_is_refused(pki, policy, mode):
    out = secure_server(pki, policy)
    try:
        assert asyncio.run(read_frame_id(out.port, pki["client"], mode)) == 41
        with pytest.raises(ua.UaError, match="No matching endpoints"):   # the server offers no None endpoint
            asyncio.run(read_frame_id(out.port))
    finally:
        out.close()


def test_the_server_itself_refuses_a_session_on_a_policy_none_channel(pki, monkeypatch):
    """A client that skips the endpoint check (asyncua's client does it, a hostile one need not) opens a None
    channel, which the spec keeps open for discovery; the server must still refuse it a session."""
    out = secure_server(pki, "Basic256Sha256_SignAndEncrypt")
    monkeypatch.setattr(Client, "find_endpoint", staticmethod(lambda endpoints, mode, uri: endpoints[0]))
    try:
        with pytest.raises(ua.UaStatusCodeError) as err:
            asyncio.run(read_frame_id(out.port))
        assert err.value.code == ua.StatusCodes.BadUserAccessDenied
    finally:
        out.close()


def test_trusted_clients_refuse_any_other_certificate(pki):
    out = secure_server(pki, "Basic256Sha256_SignAndEncrypt", trusted_clients=str(pki["trusted"]))
    try:
        assert asyncio.run(read_frame_id(out.port, pki["client"], ua.MessageSecurityMode.SignAndEncrypt)) == 41
        with pytest.raises(ua.UaStatusCodeError) as err:
            asyncio.run(read_frame_id(out.port, pki["stranger"], ua.MessageSecurityMode.SignAndEncrypt))
        assert err.value.code == ua.StatusCodes.BadCertificateUntrusted
    finally:
        out.close()


def test_users_need_their_password_and_anonymous_is_refused(pki):
    from edge_runtime.operator_page.auth import hash_password
    from edge_runtime.outputs.opcua_server import OpcUaUser

    users = [OpcUaUser(name="scada", password_hash=hash_password("s3cret-plant", n=2 ** 10))]
    out = secure_server(pki, "Basic256Sha256_SignAndEncrypt", users=users)
    mode = ua.MessageSecurityMode.SignAndEncrypt
    try:
        assert asyncio.run(read_frame_id(out.port, pki["client"], mode, user=("scada", "s3cret-plant"))) == 41
        for wrong in (("scada", "guess"), ("nobody", "s3cret-plant")):
            with pytest.raises(ua.UaStatusCodeError) as err:
                asyncio.run(read_frame_id(out.port, pki["client"], mode, user=wrong))
            assert err.value.code == ua.StatusCodes.BadUserAccessDenied
        with pytest.raises(ua.UaStatusCodeError) as err:   # anonymous
            asyncio.run(read_frame_id(out.port, pki["client"], mode))
        assert err.value.code == ua.StatusCodes.BadIdentityTokenRejected
    finally:
        out.close()


def _station(tmp_path, opcua: str):
    import textwrap

    path = tmp_path / "station.yaml"
    path.write_text("bundle: bundle\nsource: {type: folder, path: images}\noutputs:\n  - type: opcua\n"
                    + textwrap.indent(textwrap.dedent(opcua), "    "))
    return path


@pytest.mark.parametrize("body, expected", [
    ("security_policy: Basic256Sha256_Sign\nprivate_key: k.pem\ncertificate: c.der\n",
     "outputs[0].certificate: {tmp}/c.der: no such file"),
    ("security_policy: Basic256Sha256_Sign\ncertificate: {cert}\n",
     "outputs[0].private_key: required with security_policy Basic256Sha256_Sign"),
    ("certificate: {cert}\n", "outputs[0].certificate: only used with security_policy"),
    ("security_policy: Basic256Sha256\n", "outputs[0].security_policy"),
    ("users: [{{name: a, password_hash: '{hash}'}}]\n", "outputs[0].users: need security_policy"),
    ("security_policy: Basic256Sha256_Sign\ncertificate: {cert}\nprivate_key: {key}\n"
     "users: [{{name: a, password_hash: plain-text}}]\n", "outputs[0].users[0].password_hash"),
    ("security_policy: Basic256Sha256_Sign\ncertificate: {cert}\nprivate_key: {key}\ntrusted_clients: {cert}\n",
     "outputs[0].trusted_clients: {cert}: not a folder"),
])
def test_station_file_opcua_security_errors_name_the_key(tmp_path, pki, body, expected):
    from edge_runtime.config import load_station
    from edge_runtime.schema import ConfigError

    from edge_runtime.operator_page.auth import hash_password

    fill = {"tmp": tmp_path, "cert": pki["server"][0], "key": pki["server"][1], "hash": hash_password("x", n=2 ** 10)}
    with pytest.raises(ConfigError) as err:
        load_station(_station(tmp_path, body.format(**fill)))
    assert expected.format(**fill) in str(err.value), str(err.value)


def test_station_file_opcua_security_resolves_paths(tmp_path, pki):
    import shutil

    from edge_runtime.config import load_station

    shutil.copy(pki["server"][0], tmp_path / "station.der")
    shutil.copy(pki["server"][1], tmp_path / "station.pem")
    cfg = load_station(_station(tmp_path, "security_policy: Basic256Sha256_SignAndEncrypt\n"
                                          "certificate: station.der\nprivate_key: station.pem\n"))
    opc = cfg.outputs[0]
    assert opc.certificate == str(tmp_path / "station.der") and opc.private_key == str(tmp_path / "station.pem")
    assert OpcUaConfig().security_policy == "None" and OpcUaConfig().users == []


# ---- PrepareRecipe (40100 RecipeManagement): off unless allow_recipe; with users, an authenticated session only ----

class FakeRecipes:
    """The RecipeSwitcher interface PrepareRecipe uses: submit() -> Future of (outcome, message), and cfg.find()."""

    def __init__(self, outcome: str = "ok", delay_s: float = 0.3) -> None:
        from edge_runtime.recipes import RecipeConfig, RecipesConfig

        self.cfg = RecipesConfig(recipes=[RecipeConfig(name="cap-a", number=1, bundle="a"),
                                          RecipeConfig(name="cap-b", number=2, bundle="b")])
        self.outcome, self.delay_s, self.asked = outcome, delay_s, []

    def submit(self, key, origin):
        import threading
        from concurrent.futures import Future

        waiter = Future()
        self.asked.append((key, origin, time.monotonic()))
        if self.delay_s is not None:   # None: the switch never ends (the server's timeout answers)
            threading.Timer(self.delay_s, waiter.set_result, args=((self.outcome, f"{key}: {self.outcome}"),)).start()
        return waiter


async def call_prepare_recipe(port: int, key: str, cert=None, user=None):
    from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

    client = Client(f"opc.tcp://127.0.0.1:{port}/patchcore-edge/", timeout=30)
    if cert is not None:
        await client.set_security(SecurityPolicyBasic256Sha256, str(cert[0]), str(cert[1]),
                                  mode=ua.MessageSecurityMode.SignAndEncrypt)
    if user is not None:
        client.set_user(user[0])
        client.set_password(user[1])
    async with client:
        vs = await browse(client, "VisionSystem")
        t0 = time.monotonic()
        outputs = await vs.call_method(f"{vs.nodeid.NamespaceIndex}:PrepareRecipe", key)
        name = await (await browse(client, "VisionSystem", "ActiveRecipe", "ExternalId")).read_value()
        return outputs, name, t0


def test_prepare_recipe_is_absent_unless_allowed():
    out = OpcUaServer(OpcUaConfig(port=0))
    out.bind_recipes(FakeRecipes())
    out.start()
    try:
        async def call():
            async with Client(f"opc.tcp://127.0.0.1:{out.port}/patchcore-edge/") as client:
                vs = await browse(client, "VisionSystem")
                with pytest.raises(ua.UaStatusCodeError) as err:
                    await vs.get_child([f"{vs.nodeid.NamespaceIndex}:PrepareRecipe"])
                return err.value.code

        assert asyncio.run(call()) == ua.StatusCodes.BadNoMatch
        assert OpcUaConfig().allow_recipe is False
    finally:
        out.close()


def test_prepare_recipe_answers_after_the_switch_and_times_out():
    # The switch takes 0.2 s, well inside the 1.5 s timeout (0.5 and 0.5 raced: a loaded CI machine timed it out).
    recipes = FakeRecipes(delay_s=0.2)
    out = OpcUaServer(OpcUaConfig(port=0, allow_recipe=True, recipe_timeout_s=1.5))
    out.bind_recipes(recipes)
    out.start()
    try:
        outputs, name, t0 = asyncio.run(call_prepare_recipe(out.port, "cap-b"))
        assert outputs == [True, 0, "cap-b: ok"] and name == "cap-b"
        assert recipes.asked[0][:2] == ("cap-b", "opcua")
        recipes.delay_s = None                        # a switch that never ends: Error -3, not a hung call
        outputs, name, _ = asyncio.run(call_prepare_recipe(out.port, "cap-a"))
        assert outputs[:2] == [False, -3] and "not over within 1.5 s" in outputs[2] and name == "cap-b"
    finally:
        out.close()


def test_prepare_recipe_without_recipes_is_not_supported():
    out = OpcUaServer(OpcUaConfig(port=0, allow_recipe=True))
    out.start()
    try:
        with pytest.raises(ua.UaStatusCodeError) as err:
            asyncio.run(call_prepare_recipe(out.port, "cap-b"))
        assert err.value.code == ua.StatusCodes.BadNotSupported
    finally:
        out.close()


def test_prepare_recipe_with_users_needs_an_authenticated_session(pki):
    from edge_runtime.operator_page.auth import hash_password
    from edge_runtime.outputs.opcua_server import OpcUaUser

    users = [OpcUaUser(name="scada", password_hash=hash_password("s3cret-plant", n=2 ** 10))]
    recipes = FakeRecipes(delay_s=0.1)
    out = secure_server(pki, "Basic256Sha256_SignAndEncrypt", users=users, allow_recipe=True)
    out.bind_recipes(recipes)
    try:
        outputs, name, _ = asyncio.run(call_prepare_recipe(out.port, "2", pki["client"], ("scada", "s3cret-plant")))
        assert outputs[:2] == [True, 0] and name == "cap-b"
        for who in (None, ("scada", "guess")):        # anonymous, wrong password: no session, so no call
            with pytest.raises(ua.UaStatusCodeError):
                asyncio.run(call_prepare_recipe(out.port, "cap-a", pki["client"], who))
        assert [a[0] for a in recipes.asked] == ["2"]
    finally:
        out.close()


@pytest.mark.parametrize("body, expected", [
    ("allow_recipe: 'yes'\n", "outputs[0].allow_recipe"),
    ("allow_recipe: true\nrecipe_timeout_s: 0\n", "outputs[0].recipe_timeout_s: must be > 0 and <= 3600 s, got 0"),
])
def test_station_file_opcua_recipe_errors_name_the_key(tmp_path, body, expected):
    from edge_runtime.config import load_station
    from edge_runtime.schema import ConfigError

    with pytest.raises(ConfigError) as err:
        load_station(_station(tmp_path, body))
    assert expected in str(err.value), str(err.value)


def test_an_exposed_server_allowing_recipes_without_users_is_warned_about():
    found = OpcUaConfig(host="0.0.0.0", allow_recipe=True).warnings()
    assert any(w.startswith("allow_recipe: PrepareRecipe is allowed on 0.0.0.0 without users") for w in found)


def test_active_bundle_is_cleared_when_no_bundle_is_in_service():
    """Probe 76: a rollout candidate that failed its probation with no previous bundle was withdrawn (the line
    FAULT, /healthz and MQTT bundle_id null), yet ActiveRecipe/BundleId and BundleVersion kept naming it."""
    state = {"bundle_id": "cand-2", "bundle_version": 2, "frames": 2, "verdicts": {}}
    out = OpcUaServer(OpcUaConfig(port=0, state_interval_s=0.1))
    out.bind_state(lambda: dict(state))
    out.start()
    try:
        async def run():
            async with Client(f"opc.tcp://127.0.0.1:{out.port}/patchcore-edge/") as client:
                bundle_id = await browse(client, "VisionSystem", "ActiveRecipe", "BundleId")
                version = await browse(client, "VisionSystem", "ActiveRecipe", "BundleVersion")
                assert await wait_value(bundle_id, "cand-2") == "cand-2"
                state.update(bundle_id=None, bundle_version=None)   # withdrawn: FAULT until a verified bundle
                out.set_fault("bundle: bundle cand-2 failed its probation and there is no previous bundle")
                assert await wait_value(bundle_id, "") == ""
                assert await wait_value(version, -1) == -1
        asyncio.run(run())
    finally:
        out.close()
