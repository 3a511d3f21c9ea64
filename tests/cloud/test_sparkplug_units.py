"""Sparkplug B host logic without services: the schema against an independent encoder
(pysparkplug, run in its own venv), and the session rules of the spec (seq, bdSeq, aliases)
and the hostile payloads, judged by `Sessions` alone."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2

from millrace.cloud.ingest.messages import DeadLetter
from millrace.cloud.sparkplug import schema
from millrace.cloud.sparkplug.config import SparkplugConfig
from millrace.cloud.sparkplug.sessions import Accepted, Bounds, Duplicate, Refused, Sessions
from millrace.cloud.sparkplug.windows import Windows
from millrace.configfile import BrokerConnection
from tests.fixtures.fix_broker import PKIFixture

SPB_PYTHON = Path(sys.prefix) / "pysparkplug" / "bin" / "python"
NOW_MS = 1_800_000_000_000
NODE = "spBv1.0/plant/{kind}/node1"
DEVICE = "spBv1.0/plant/{kind}/node1/pump1"


def peer(code: str) -> bytes:
    """Run `code` in pysparkplug's venv (made by scripts/bootstrap); its stdout."""
    if not SPB_PYTHON.exists():
        pytest.fail(f"{SPB_PYTHON} missing: run make setup (scripts/bootstrap makes it)")
    done = subprocess.run(
        [str(SPB_PYTHON), "-c", code], capture_output=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def _fields(messages: Any, prefix: str, out: dict[Any, Any]) -> dict[Any, Any]:
    for m in messages:
        for f in m.field:
            kind = f.type_name.rsplit(".", 1)[-1]
            out[(prefix + m.name, f.name)] = (
                f.number,
                f.label,
                f.type,
                kind,
                f.HasField("oneof_index"),
            )
        _fields(m.nested_type, f"{prefix}{m.name}.", out)
    return out


def test_schema_is_field_for_field_the_one_pysparkplug_ships() -> None:
    dumped = peer(
        "import sys; from google.protobuf import descriptor_pb2 as d;"
        "from pysparkplug._protobuf import sparkplug_b_pb2 as pb;"
        "f = d.FileDescriptorProto(); pb.DESCRIPTOR.CopyToProto(f);"
        "sys.stdout.buffer.write(f.SerializeToString())"
    )
    theirs = descriptor_pb2.FileDescriptorProto.FromString(dumped)
    assert theirs.package == schema.PACKAGE
    expected = _fields(theirs.message_type, "", {})
    assert len(expected) > 60
    assert _fields(schema._file().message_type, "", {}) == expected


ENCODE_BIRTH = """
import datetime, sys
from pysparkplug import DataType as T, Metric, NBirth
values = [
    ("i8", T.INT8, -5), ("i16", T.INT16, -300), ("i32", T.INT32, -100000),
    ("i64", T.INT64, -(2**40)), ("u8", T.UINT8, 250), ("u16", T.UINT16, 65000),
    ("u32", T.UINT32, 4000000000), ("u64", T.UINT64, 2**50), ("f", T.FLOAT, 1.5),
    ("d", T.DOUBLE, -2.25), ("b", T.BOOLEAN, True), ("s", T.STRING, "auto"),
    ("Folder/t", T.TEXT, "a text"),
    ("dt", T.DATETIME, datetime.datetime.fromtimestamp(1700000000.123, datetime.timezone.utc)),
]
metrics = [Metric(timestamp=1800000000000, name=n, datatype=t, value=v, alias=i)
           for i, (n, t, v) in enumerate(values)]
metrics.append(Metric(timestamp=1800000000000, name="bdSeq", datatype=T.INT64, value=7))
birth = NBirth(timestamp=1800000000000, seq=0, metrics=metrics)
sys.stdout.buffer.write(birth.encode(include_dtypes=True))
"""


def test_pysparkplug_birth_decodes_to_its_values_with_signed_ints_and_folders() -> None:
    outcome = Sessions().handle(NODE.format(kind="NBIRTH"), peer(ENCODE_BIRTH), NOW_MS)
    assert isinstance(outcome, Accepted), outcome
    got = {
        r.metric: (r.value.number if r.value.number is not None else r.value.other)
        for r in outcome.readings
    }
    assert got == {
        "i8": -5.0, "i16": -300.0, "i32": -100000.0, "i64": float(-(2**40)), "u8": 250.0,
        "u16": 65000.0, "u32": 4e9, "u64": float(2**50), "f": 1.5, "d": -2.25, "b": True,
        "s": "auto", "Folder.t": "a text", "dt": 1700000000123.0,
    }  # fmt: skip
    assert {r.device for r in outcome.readings} == {"plant.node1"}
    assert all(r.ts_ms == NOW_MS for r in outcome.readings)
    assert outcome.online == {"plant.node1": {}}


def payload(seq: int | None, metrics: list[dict[str, Any]], *, ts: int = NOW_MS) -> bytes:
    p = schema.Payload()
    p.timestamp = ts
    if seq is not None:
        p.seq = seq
    for spec in metrics:
        m = p.metrics.add()
        for key, value in spec.items():
            setattr(m, key, value)
    return p.SerializeToString()


def birth(seq: int = 0, bd_seq: int = 0) -> bytes:
    return payload(
        seq,
        [
            {"name": "bdSeq", "datatype": 4, "long_value": bd_seq},
            {"name": "Node Control/Rebirth", "datatype": 11, "boolean_value": False},
            {"name": "temp", "alias": 1, "datatype": 10, "double_value": 20.0},
        ],
    )


def data(seq: int, value: float = 21.0) -> bytes:
    return payload(seq, [{"alias": 1, "double_value": value}])


def test_seq_wraps_a_gap_asks_for_rebirth_and_a_redelivery_is_dropped() -> None:
    s = Sessions()
    assert isinstance(s.handle(NODE.format(kind="NBIRTH"), birth(seq=254), NOW_MS), Accepted)
    ndata = NODE.format(kind="NDATA")
    for seq in (255, 0, 1):  # 255 wraps to 0
        out = s.handle(ndata, data(seq), NOW_MS)
        assert isinstance(out, Accepted) and [r.metric for r in out.readings] == ["temp"], seq
    assert s.handle(ndata, data(1), NOW_MS) == Duplicate("plant.node1")
    gap = s.handle(ndata, data(3), NOW_MS)
    assert isinstance(gap, Refused) and gap.code == "seq_gap" and gap.rebirth, gap
    assert "expected 2" in gap.reason
    stale = s.handle(ndata, data(4), NOW_MS)  # nothing trusted until the rebirth
    assert isinstance(stale, Refused) and stale.code == "awaiting_rebirth"
    assert isinstance(s.handle(NODE.format(kind="NBIRTH"), birth(bd_seq=1), NOW_MS), Accepted)
    assert isinstance(s.handle(ndata, data(1), NOW_MS), Accepted)
    reordered = s.handle(ndata, data(0), NOW_MS)
    assert isinstance(reordered, Refused) and reordered.code == "seq_gap"


def test_only_the_ndeath_of_the_current_bdseq_ends_the_session() -> None:
    s = Sessions()
    s.handle(NODE.format(kind="NBIRTH"), birth(bd_seq=3), NOW_MS)
    dbirth = payload(1, [{"name": "flow", "alias": 2, "datatype": 9, "float_value": 1.0}])
    assert isinstance(s.handle(DEVICE.format(kind="DBIRTH"), dbirth, NOW_MS), Accepted)
    death = NODE.format(kind="NDEATH")
    old = s.handle(
        death, payload(None, [{"name": "bdSeq", "datatype": 4, "long_value": 2}]), NOW_MS
    )
    assert isinstance(old, Refused) and old.code == "stale_death" and not old.rebirth
    assert isinstance(s.handle(NODE.format(kind="NDATA"), data(2), NOW_MS), Accepted)
    out = s.handle(
        death, payload(None, [{"name": "bdSeq", "datatype": 4, "long_value": 3}]), NOW_MS
    )
    assert isinstance(out, Accepted)
    assert out.offline == ["plant.node1", "plant.node1.pump1"]
    after = s.handle(NODE.format(kind="NDATA"), data(3), NOW_MS)
    assert isinstance(after, Refused) and after.code == "no_birth" and after.rebirth


def test_a_device_with_no_millrace_id_is_refused_without_stalling_its_node() -> None:
    s = Sessions()
    s.handle(NODE.format(kind="NBIRTH"), birth(), NOW_MS)
    dbirth = payload(1, [{"name": "flow", "datatype": 9, "float_value": 1.0}])
    out = s.handle("spBv1.0/plant/DBIRTH/node1/Pump 2!", dbirth, NOW_MS)
    assert isinstance(out, Refused) and out.code == "bad_id" and not out.rebirth
    assert isinstance(s.handle(NODE.format(kind="NDATA"), data(2), NOW_MS), Accepted)


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (b"\xff\xff\xff not protobuf", "undecodable"),
        (payload(1, [{"alias": 99, "double_value": 1.0}]), "unknown_alias"),
        (payload(1, [{"alias": 1, "int_value": 5}]), "wrong_datatype"),
        (payload(1, [{"alias": 1, "datatype": 3, "int_value": 5}]), "wrong_datatype"),
        (payload(1, [{"name": "nope", "double_value": 1.0}]), "unknown_metric"),
        (payload(1, [{"alias": 1, "double_value": 1.0}] * 11), "too_many_metrics"),
        (payload(1, [{"alias": 1, "double_value": 1.0, "timestamp": 5}]), "invalid"),
        (
            payload(1, [{"alias": 1, "double_value": 1.0, "timestamp": NOW_MS + 3_600_000}]),
            "in_future",
        ),
        (payload(1, []) + b"\x00" * 2000, "oversize"),
    ],
)
def test_hostile_ndata_is_refused_with_its_reason(message: bytes, code: str) -> None:
    s = Sessions(Bounds(max_payload_bytes=1024, max_metrics=10))
    s.handle(NODE.format(kind="NBIRTH"), birth(), NOW_MS)
    out = s.handle(NODE.format(kind="NDATA"), message, NOW_MS)
    assert isinstance(out, Refused) and out.code == code, out
    assert out.device == "plant.node1" and out.reason


def test_windows_align_and_count_non_finite_values_rejected() -> None:
    w = Windows((1, 10), grace_ms=500)
    start = NOW_MS - 20_000
    for i, x in enumerate((3.0, 1.0, float("nan"), 2.0)):
        w.add("d", "m", start + 100 * (3 - i), x)  # out of time order on purpose
    assert w.close(start + 1_400) == {}  # still inside the grace period
    one = w.close(start + 1_500)["d"]
    assert [
        (x.period_s, x.count, x.sum, x.min, x.max, x.first, x.last, x.rejected) for x in one
    ] == [(1, 3, 6.0, 1.0, 3.0, 2.0, 3.0, 1)]
    assert [x.period_s for x in w.close(None)["d"]] == [10]


def test_state_payload_is_the_spec_json() -> None:
    from millrace.cloud.sparkplug.host import rebirth_payload, state_payload

    assert json.loads(state_payload(True, 5)) == {"online": True, "timestamp": 5}
    ncmd = schema.parse_payload(rebirth_payload(NOW_MS))
    assert [(m.name, m.datatype, m.boolean_value) for m in ncmd.metrics] == [
        ("Node Control/Rebirth", 11, True)
    ]


def test_the_config_example_in_docs_loads_and_bad_keys_are_named(tmp_path: Path) -> None:
    from millrace.cloud.sparkplug.config import load_config
    from millrace.errors import ConfigError

    doc = (Path(__file__).parents[2] / "docs" / "sparkplug.md").read_text()
    example = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    dsn_file = tmp_path / "ingest.dsn"
    dsn_file.write_text("postgresql://ingest@db.plant.example/millrace\n")
    for name in ("ca.crt", "sparkplug-host.crt", "sparkplug-host.key"):
        (tmp_path / name).write_text("")
    path = tmp_path / "sparkplug.toml"
    text = example.replace("/etc/millrace/ingest.dsn", str(dsn_file))
    path.write_text(text)
    config = load_config(path)
    assert (config.host_id, config.groups, config.periods_s) == (
        "sparkplug-host",
        ("line1", "line2"),
        (10, 60),
    )
    assert "ingest@" not in repr(config)
    for wrong, bad, named in (
        ('groups = ["line1", "line2"]', 'groups = ["a/b"]', "sparkplug.groups[0]"),
        ("periods_s = [10, 60]", "periods_s = [10, 7]", "sparkplug.periods_s[1]"),
        ('host_id = "sparkplug-host"', 'host_id = "h"\nhostid = "y"', "sparkplug.hostid"),
    ):
        path.write_text(text.replace(wrong, bad))
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert named in str(caught.value), caught.value


def _topic(group: str, kind: str, node: str, device: str | None = None) -> str:
    return f"spBv1.0/{group}/{kind}/{node}" + ("" if device is None else f"/{device}")


def _death(bd_seq: int = 0) -> bytes:
    return payload(None, [{"name": "bdSeq", "datatype": 4, "long_value": bd_seq}])


def _dbirth(seq: int) -> bytes:
    return payload(seq, [{"name": "flow", "alias": 2, "datatype": 10, "double_value": 1.0}])


def _collision(out: object, device: str, *sources: str) -> None:
    assert isinstance(out, Refused) and out.code == "id_collision", out
    assert out.device == device and not out.rebirth
    for named in (*sources, repr(device), "rename one"):
        assert named in out.reason, out.reason


def test_two_nodes_whose_ids_differ_only_in_case_are_not_merged_into_one_device() -> None:
    s = Sessions()
    assert isinstance(s.handle(_topic("plant", "NBIRTH", "line1"), birth(), NOW_MS), Accepted)
    intruder = s.handle(_topic("Plant", "NBIRTH", "Line1"), birth(), NOW_MS)
    _collision(intruder, "plant.line1", "'Plant/Line1'", "'plant/line1'")
    _collision(s.handle(_topic("Plant", "NDATA", "Line1"), data(1, 99.0), NOW_MS), "plant.line1")
    owner = s.handle(_topic("plant", "NDATA", "line1"), data(1, 21.0), NOW_MS)
    assert isinstance(owner, Accepted)
    assert [(r.device, r.value.number) for r in owner.readings] == [("plant.line1", 21.0)]
    # The intruder's death (its own bdSeq) must not mark the owner offline.
    _collision(s.handle(_topic("Plant", "NDEATH", "Line1"), _death(), NOW_MS), "plant.line1")
    assert isinstance(s.handle(_topic("plant", "NDATA", "line1"), data(2), NOW_MS), Accepted)


def test_group_and_node_split_differently_by_a_dot_are_not_merged() -> None:
    s = Sessions()
    owner, intruder = ("a.b", "c"), ("a", "b.c")  # both a.b.c; devices a.b.c.<device>
    assert isinstance(s.handle(_topic(owner[0], "NBIRTH", owner[1]), birth(), NOW_MS), Accepted)
    assert isinstance(
        s.handle(_topic(*owner[:1], "DBIRTH", owner[1], "pump"), _dbirth(1), NOW_MS), Accepted
    )
    _collision(s.handle(_topic(intruder[0], "NBIRTH", intruder[1]), birth(), NOW_MS), "a.b.c")
    _collision(
        s.handle(_topic(intruder[0], "DBIRTH", intruder[1], "pump"), _dbirth(1), NOW_MS),
        "a.b.c.pump",
        "'a/b.c/pump'",
        "'a.b/c/pump'",
    )
    # Its session is still followed: a device of its own id is not stalled, no seq gap.
    valve = s.handle(_topic(intruder[0], "DBIRTH", intruder[1], "valve"), _dbirth(2), NOW_MS)
    assert isinstance(valve, Accepted) and valve.online == {"a.b.c.valve": {}}
    ddata = payload(3, [{"alias": 2, "double_value": 5.0}])
    _collision(
        s.handle(_topic(intruder[0], "DDATA", intruder[1], "pump"), ddata, NOW_MS), "a.b.c.pump"
    )
    ddata = payload(4, [{"alias": 2, "double_value": 6.0}])
    out = s.handle(_topic(intruder[0], "DDATA", intruder[1], "valve"), ddata, NOW_MS)
    assert isinstance(out, Accepted) and [r.device for r in out.readings] == ["a.b.c.valve"]
    # Its NDEATH takes only its own device offline.
    out = s.handle(_topic(intruder[0], "NDEATH", intruder[1]), _death(), NOW_MS)
    assert isinstance(out, Accepted) and out.offline == ["a.b.c.valve"]
    ddata = payload(2, [{"alias": 2, "double_value": 7.0}])
    out = s.handle(_topic(*owner[:1], "DDATA", owner[1], "pump"), ddata, NOW_MS)
    assert isinstance(out, Accepted) and [r.value.number for r in out.readings] == [7.0]


def test_a_colliding_node_cannot_take_over_the_device_after_the_owner_dies() -> None:
    s = Sessions()
    s.handle(_topic("plant", "NBIRTH", "line1"), birth(bd_seq=0), NOW_MS)
    died = s.handle(_topic("plant", "NDEATH", "line1"), _death(0), NOW_MS)
    assert isinstance(died, Accepted) and died.offline == ["plant.line1"]
    # The colliding node reconnects first: the owner's claim outlives its session.
    _collision(s.handle(_topic("PLANT", "NBIRTH", "line1"), birth(), NOW_MS), "plant.line1")
    _collision(s.handle(_topic("PLANT", "NDATA", "line1"), data(1), NOW_MS), "plant.line1")
    back = s.handle(_topic("plant", "NBIRTH", "line1"), birth(bd_seq=1), NOW_MS)
    assert isinstance(back, Accepted) and back.online == {"plant.line1": {}}


def test_a_colliding_node_never_reaches_the_owners_windows_and_keeps_its_birth_broker(
    test_pki: PKIFixture,
) -> None:
    from millrace.cloud.sparkplug.host import Host

    cert, key = test_pki.issue("svc-test", role="service")
    config = SparkplugConfig(
        dsn="postgresql://nobody@127.0.0.1:1/none",  # never reached: nothing is flushed
        broker=BrokerConnection(
            host="127.0.0.1",
            port=1,
            ca=test_pki.ca,
            cert=cert,
            key=key,
            hosts=(("127.0.0.1", 1), ("127.0.0.1", 2)),
        ),
        host_id="svc-test",
        groups=("plant",),
        periods_s=(10,),
    )
    host = Host(config)  # not run: judged by hand, no broker
    at = datetime.fromtimestamp(NOW_MS / 1000, UTC)
    host.judge(_topic("plant", "NBIRTH", "line1"), birth(), at, broker=0)  # temp 20
    host.judge(_topic("plant", "NDATA", "line1"), data(1, 21.0), at, broker=0)
    host.judge(_topic("Plant", "NBIRTH", "Line1"), birth(), at, broker=1)
    host.judge(_topic("Plant", "NDATA", "Line1"), data(1, 99.0), at, broker=1)
    # The refused birth still opened its session on broker 1: through broker 0 it is stale.
    host.judge(_topic("Plant", "NDATA", "Line1"), data(2, 98.0), at, broker=0)
    assert dict(host.counters.refused) == {"id_collision": 2, "other_broker": 1}
    assert host.counters.rebirths_asked == 1  # for other_broker only: no rebirth fixes a name
    (window,) = host.windows.close(None)["plant.line1"]
    assert (window.count, window.sum, window.max) == (2, 41.0, 21.0)
    collided = [i for i in host._items if isinstance(i, DeadLetter) and i.code == "id_collision"]
    assert [i.device for i in collided] == ["plant.line1"] * 2
