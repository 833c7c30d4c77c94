"""The COPY text of a bulk insert of rules: the rendered-once tail against csv.writer itself (no database)."""

from __future__ import annotations

import csv
import datetime
import io

import pytest

from provfw.db.sqlalchemy import api as impl
from provfw.rules import make_spec

NOW = datetime.datetime(2026, 12, 1, 19, 0, 0, 123456)
SPECS = [make_spec(cidr, protocol, *ports)
         for cidr in ("192.0.2.1", "2001:db8::/32", "10.0.0.0/8", "::102:304", "2001:db8::1")
         for protocol, ports in (("all", ()), ("tcp", (22, 80)), ("udp", ()), ("icmp", (8, 0)), ("icmp", (-1, -1)))]


def _read_all(stream: impl._CsvStream) -> str:
    return "".join(iter(stream.read, ""))


@pytest.mark.parametrize("tail", [
    (None, None, NOW, None, 5, 0),
    ('a "quoted", multi-line\ndescription', "token,with,commas", NOW, NOW, 7, 0),
    ("", "\u00e9t\u00e9", NOW, None, 9, 0),
])
def test_rule_rows_copy_text_is_what_csv_writer_writes(tail):
    specs = SPECS * 900                       # more than one chunk
    rows = impl._RuleRows(specs, tail)
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)        # the tuples, through the generic writer
    assert _read_all(impl._CsvStream(rows)) == buffer.getvalue()
    assert _read_all(impl._CsvStream(list(rows))) == buffer.getvalue()
    assert next(iter(rows)) == (SPECS[0].cidr, 4, "all", -1, -1, *tail)


def test_an_empty_insert_is_an_empty_stream():
    assert _read_all(impl._CsvStream(impl._RuleRows([], (None, None, NOW, None, 1, 0)))) == ""
    assert _read_all(impl._CsvStream([])) == ""
