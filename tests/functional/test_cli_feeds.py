"""``provfw`` for block lists: sources, replace-sync, the guard, ``why`` and ``feed ...``, against the real API
served over HTTP (SQLite, in-process bus), a real feed server, and the conductor's feed syncer in a thread."""

from __future__ import annotations

import json
import threading

import pytest

from provfw.conductor import feeds as conductor_feeds
from provfw.db import api as db
from tests.functional import test_cli
from tests.functional.test_cli import admin
from tests.lib.httpserver import FeedServer, data_file

pytestmark = pytest.mark.functional

api, home = test_cli.api, test_cli.home          # test_cli's fixtures, shared


def lines_of(ran):
    return ran.out.splitlines()


def test_import_detects_the_format_and_names_the_source_after_the_file(api, home, capsys, tmp_path):
    drop = tmp_path / "drop.txt"
    drop.write_bytes(data_file("feeds", "spamhaus-drop.txt"))
    result = admin(capsys, api, "import", str(drop))
    assert result.code == 0, result.err
    assert lines_of(result)[0].startswith(f"imported {drop} (spamhaus, detected) into import:drop.txt: "
                                          "4 added, 0 renewed, 0 duplicate, 0 refused, generation ")
    rows = json.loads(admin(capsys, api, "rules", "--source", "import:drop.txt", "-o", "json").out)
    assert len(rows) == 4 and all(r["sources"][0]["source"] == "import:drop.txt" for r in rows)
    assert admin(capsys, api, "sources", "-o", "value").out == "import:drop.txt\t4\n"


def test_import_says_which_format_it_read_and_whether_it_was_detected(api, home, capsys, tmp_path):
    drop = tmp_path / "drop.txt"
    drop.write_bytes(data_file("feeds", "spamhaus-drop.txt"))
    chosen = admin(capsys, api, "import", str(drop), "--format", "drop", "--dry-run")
    assert chosen.code == 0 and lines_of(chosen)[0].startswith(
        f"dry run, nothing changed: imported {drop} (spamhaus) into import:drop.txt would give 4 added")
    detected = admin(capsys, api, "import", str(drop), "--dry-run")
    assert f"imported {drop} (spamhaus, detected) into" in lines_of(detected)[0]


def test_a_replace_reports_what_it_removed_and_the_guard_stops_a_truncated_list(api, home, capsys, tmp_path):
    daily = tmp_path / "daily.txt"
    daily.write_bytes(data_file("feeds", "sync", "daily-1.txt"))
    first = admin(capsys, api, "import", str(daily), "--source", "daily", "--mode", "replace")
    assert first.code == 0 and "replaced import:daily with" in first.out and "40 added" in first.out
    daily.write_bytes(data_file("feeds", "sync", "daily-2.txt"))
    second = admin(capsys, api, "import", str(daily), "--source", "daily", "--mode", "replace")
    assert ": 3 added, 3 removed (3 deleted), 0 renewed, 37 duplicate, 0 refused, generation" in second.out

    daily.write_bytes(data_file("feeds", "sync", "daily-truncated.txt"))
    refused = admin(capsys, api, "import", str(daily), "--source", "daily", "--mode", "replace")
    assert refused.code == 1 and "HTTP 409" in refused.err and "pass force=true (the CLI's --force)" in refused.err
    dry = admin(capsys, api, "import", str(daily), "--source", "daily", "--mode", "replace", "--dry-run")
    # The dry run prints what would happen and, since the real import would be refused, fails (exit 1) as
    # nft -c does, so that a script's "dry run && import" stops at the dry run.
    assert dry.code == 1 and lines_of(dry)[0].startswith("dry run, nothing changed: replaced import:daily")
    assert "the replace guard refuses this: it removes 32 of the 40 rules in force" in dry.out
    assert dry.err == ("provfw: the replace guard would refuse this import (HTTP 409); nothing was changed; add "
                       "--force if the list really shrank\n")
    forced_dry = admin(capsys, api, "import", str(daily), "--source", "daily", "--mode", "replace", "--dry-run",
                       "--force")
    assert forced_dry.code == 0 and "32 removed" in forced_dry.out and forced_dry.err == ""
    assert "the replace guard would be passed with --force" in forced_dry.out
    assert "line 11:" in dry.out                                      # the cut-off last line, with its number
    assert len(json.loads(admin(capsys, api, "rules", "-o", "json").out)) == 40
    forced = admin(capsys, api, "import", str(daily), "--source", "daily", "--mode", "replace", "--force")
    assert forced.code == 0 and "32 removed" in forced.out and "was passed with --force" in forced.out


def test_reblocking_with_a_later_expiry_says_renewed(api, home, capsys):
    added = admin(capsys, api, "rule-add", "192.0.2.50", "--ttl", "60")
    created = db.provider_fw_generation_get()
    assert added.code == 0 and f"generation {created}" in added.out
    renewed = admin(capsys, api, "rule-add", "192.0.2.50")
    assert renewed.code == 0 and renewed.out.startswith("renewed rule ") and "expires" not in renewed.out
    # The renewal's own generation, not the one that created the rule (found printing the same number twice).
    assert f"generation {created + 1}" in renewed.out and db.provider_fw_generation_get() == created + 1
    blocked = admin(capsys, api, "block", "198.51.100.7", "--ttl", "60")
    again = admin(capsys, api, "block", "198.51.100.7")
    assert blocked.code == again.code == 0 and "0 rules added, 3 rules renewed" in again.out


def test_non_global_ranges_need_the_opt_in_on_the_command_line(api, home, capsys):
    refused = admin(capsys, api, "block", "10.1.2.0/24")
    assert refused.code == 1 and "10.0.0.0/8, private network" in refused.err
    assert admin(capsys, api, "block", "10.1.2.0/24", "--allow-non-global").code == 0


def test_why_names_each_rule_its_sources_and_the_hosts_that_enforce_it(api, home, capsys, tmp_path):
    lists = tmp_path / "drop.txt"
    lists.write_text("198.51.100.0/24\n198.51.0.0/16\n")
    admin(capsys, api, "import", str(lists), "--source", "drop")
    host_rule = json.loads(admin(capsys, api, "rule-add", "198.51.100.7", "--protocol", "tcp", "--from-port", "22",
                                 "-o", "json").out)["rule"]           # the API's answer: {"rule", "generation", ...}
    generation = db.provider_fw_generation_get()
    db.service_update("hv-1", heartbeat=True, driver="ipset", applied_generation=generation, rule_count=3)
    db.service_update("hv-2", heartbeat=True, driver="ipset", applied_generation=generation - 1, rule_count=2)
    db.service_update("hv-3", heartbeat=True, driver="ipset", applied_generation=generation, rule_count=2,
                      quarantine=json.dumps([{"id": host_rule["id"], "cidr": "198.51.100.7/32",
                                              "reason": "ipset refused it"}]))
    why = admin(capsys, api, "why", "198.51.100.7")
    assert why.code == 0, why.err
    heading, header, first, second, third, *details = lines_of(why)
    assert heading == "198.51.100.7 is blocked by 3 rules, most specific first:"
    assert header.split() == ["id", "cidr", "protocol", "from_port", "to_port", "source", "expires_at",
                              "generation", "enforced", "covers"]
    assert first.split()[1:6] == ["198.51.100.7/32", "tcp", "22", "22", "manual"]
    assert first.split()[-3:] == ["1/3", "hosts", "all"] and second.split()[-3:] == ["3/3", "hosts", "all"]
    assert second.split()[1] == "198.51.100.0/24" and "import:drop" in second and "198.51.0.0/16" in third
    assert details == [f"  rule {host_rule['id']}: hv-2: not yet (applied generation {generation - 1} < "
                       f"{generation})",
                       f"  rule {host_rule['id']}: hv-3: refused rule {host_rule['id']} (quarantined: ipset "
                       "refused it)"]
    assert admin(capsys, api, "why", "203.0.113.1").out == "203.0.113.1 is not blocked by any live rule\n"
    as_json = json.loads(admin(capsys, api, "why", "198.51.100.7", "-o", "json").out)
    assert [r["enforced"] for r in as_json["rules"]] == ["1/3 hosts", "3/3 hosts", "3/3 hosts"]


def test_why_a_network_names_the_narrower_rules_that_block_parts_of_it(api, home, capsys, tmp_path):
    # A network used to be "not blocked by any live rule" even with rules for parts of it.
    lists = tmp_path / "parts.txt"
    lists.write_text("203.0.113.5\n203.0.113.128/25\n203.0.114.1\n2001:db8:0:1:1:1:1:5\n")
    assert admin(capsys, api, "import", str(lists), "--source", "parts").code == 0
    why = admin(capsys, api, "why", "203.0.113.0/24")
    assert why.code == 0, why.err
    heading, _header, first, second = lines_of(why)
    assert heading == "203.0.113.0/24 is not blocked as a whole; 2 narrower rules inside it block parts of it:"
    assert [first.split()[1], second.split()[1]] == ["203.0.113.5/32", "203.0.113.128/25"]
    both = lines_of(admin(capsys, api, "why", "203.0.112.0/23"))
    assert both[0] == "203.0.112.0/23 is not blocked as a whole; 2 narrower rules inside it block parts of it:"
    admin(capsys, api, "block", "203.0.112.0/22")
    wider = lines_of(admin(capsys, api, "why", "203.0.113.0/24"))
    assert wider[0] == ("203.0.113.0/24 is blocked by 3 rules, most specific first, then 2 narrower rules "
                        "inside it:")
    assert "203.0.113.0/24" not in admin(capsys, api, "why", "203.0.113.6").out.split("\n", 1)[0]
    v6 = lines_of(admin(capsys, api, "why", "2001:db8::/32"))
    assert v6[0].endswith("1 narrower rule inside it blocks parts of it:") and "2001:db8:0:1:1:1:1:5/128" in v6[2]
    # -o value tells a script which rows cover the whole network and which only a part (its last column).
    mixed = admin(capsys, api, "why", "203.0.113.0/24", "-o", "value").out.splitlines()
    assert [(row.split("\t")[1], row.split("\t")[-1]) for row in mixed] == [
        ("203.0.112.0/22", "all")] * 3 + [("203.0.113.5/32", "part"), ("203.0.113.128/25", "part")]
    as_json = json.loads(admin(capsys, api, "why", "203.0.113.0/24", "-o", "json").out)
    assert [r["cidr"] for r in as_json["inside"]] == ["203.0.113.5/32", "203.0.113.128/25"]
    listed = admin(capsys, api, "rules", "--within", "203.0.113.0/25", "-o", "value").out
    assert [line.split("\t")[1] for line in listed.splitlines()] == ["203.0.113.5/32"]
    assert admin(capsys, api, "rules", "--within", "192.0.2.0/24").out == "no rules inside 192.0.2.0/24\n"
    # More than 20 narrower rules: 20 shown and a pointer to the whole list, also when the network's own
    # rules (a block: tcp, udp and icmp) come first in id order.
    admin(capsys, api, "block", "198.18.0.0/24", "--allow-non-global")
    many = tmp_path / "many.txt"
    many.write_text("".join(f"198.18.0.{i}\n" for i in range(1, 22)))
    assert admin(capsys, api, "import", str(many), "--allow-non-global").code == 0
    crowded = lines_of(admin(capsys, api, "why", "198.18.0.0/24"))
    assert crowded[0] == ("198.18.0.0/24 is blocked by 3 rules, most specific first, then more than 20 narrower "
                          "rules (the first 20 shown; provfw rules --within 198.18.0.0/24 lists them all) inside it:")
    assert len(crowded) == 2 + 3 + 20
    # A host whose firewall driver is noop applies every generation and enforces nothing: why says so.
    db.service_update("hv-noop", heartbeat=True, driver="libvirt/noop",
                      applied_generation=db.provider_fw_generation_get(), rule_count=8)
    noop = lines_of(admin(capsys, api, "why", "203.0.113.5"))
    assert "0/1 hosts" in noop[2] and noop[-1].endswith("hv-noop: its firewall driver is noop, which enforces nothing")


@pytest.fixture
def conductor(conf, api):
    """The conductor's feed syncer polling every 50 ms in a thread, and a feed server."""
    server = FeedServer()
    syncer = conductor_feeds.FeedSyncer(conf, None, host="test-conductor")
    stop = threading.Event()

    def loop():
        while not stop.wait(0.05):
            syncer.run_due()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield server
    stop.set()
    thread.join(10)
    server.close()


def test_feed_commands_add_sync_show_list_change_and_remove(api, home, capsys, conf, conductor):
    conf.set_override("min_interval", 60, group="feeds")
    conductor.publish("/drop.txt", data_file("feeds", "spamhaus-drop.txt"))
    added = admin(capsys, api, "feed", "add", "drop", conductor.url("/drop.txt"), "--interval", "3600",
                  "--description", "Spamhaus DROP")
    assert added.code == 0, added.err
    assert added.out.startswith("added feed drop (feed:drop): every 3,600 s from http://127.0.0.1:")
    synced = admin(capsys, api, "feed", "sync", "drop", "--timeout", "20")
    assert synced.code == 0, synced.err
    assert synced.out.startswith("synced feed drop: ")                # first sync, or the one asked for
    assert len(json.loads(admin(capsys, api, "rules", "--source", "feed:drop", "--json").out)) == 4

    listing = lines_of(admin(capsys, api, "feed", "list"))
    assert listing[0].split()[:7] == ["name", "enabled", "interval", "rules", "last_status", "last_sync", "refused"]
    assert listing[1].split()[:5] == ["drop", "true", "3600", "4", "ok"]
    shown = dict(line.split(None, 1) for line in lines_of(admin(capsys, api, "feed", "show", "drop"))
                 if len(line.split(None, 1)) == 2)
    assert (shown["source"], shown["format"], shown["entries"], shown["last_status"]) == ("feed:drop", "auto",
                                                                                          "4", "ok")

    conductor.lists["/drop.txt"].status = 503
    failed = admin(capsys, api, "feed", "sync", "drop", "--timeout", "20")
    assert failed.code == 1 and "fetch_error" in failed.err and "HTTP 503" in failed.err
    assert "last good list stay in force" in failed.err
    assert len(json.loads(admin(capsys, api, "rules", "--source", "feed:drop", "--json").out)) == 4

    disabled = admin(capsys, api, "feed", "set", "drop", "--disable")
    assert disabled.code == 0 and "disabled, next sync never" in disabled.out
    assert admin(capsys, api, "feed", "sync", "drop").code == 1
    removed = admin(capsys, api, "feed", "remove", "drop")
    assert removed.code == 0 and removed.out.startswith("removed feed drop: 4 rules released, 4 deleted")
    assert admin(capsys, api, "feed", "list").out == "no feeds\n"
