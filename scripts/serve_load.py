"""Load, overload, slow-client and bad-body checks of `agiqa serve` (run by scripts/serve-load).

Starts `agiqa serve` on a free loopback port, runs bounded phases against it, stops it and prints
one markdown table:

1. unloaded: one client, one request at a time (the baseline latency);
2. held: N closed-loop clients (requests/s, p50/p99);
3. overload: an open-loop arrival rate of `--overload-factor` times the held rate against a
   small `--queue`: 200 / 503 / other counts, the 503s' latency, the accepted requests' p99
   against the unloaded and held p99 (issue 13's "excess gets 503 within 50 ms, accepted p99
   within 2x the unloaded p99" is printed, not enforced: it is a benchmark); then as many
   times the held clients in closed loop (the crowd of the issue's first report);
4. slow clients: sockets that send half a header and stall must be closed after the header
   timeout while normal requests keep succeeding;
5. bad bodies (empty, garbage, truncated JPEG, decompression bombs, a gzip bomb, broken
   multipart, over the body limit) must each get a 4xx;
6. the server's peak RSS (VmHWM).

Only the standard library: asyncio streams with a small HTTP/1.1 client (keep-alive, and a
retry when a pooled connection turns out closed before any byte of a response). Everything is
bounded: per-phase seconds and request counts, client timeouts, and a watchdog that kills the
server and exits 124 past `--time-limit`. Exit status 1 when a check that must hold fails (a
bad body answered 2xx/5xx or not at all, slow sockets left open by a binary that has
`--header-timeout`, requests within capacity answered anything but 200 or 503, the server
dying), so the quick variant is a real test.
"""

import argparse
import asyncio
import gzip
import json
import math
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# A minimal HTTP/1.1 client on asyncio streams


class Closed(Exception):
    """The connection ended before a whole response; `started` if some of it had arrived."""

    def __init__(self, why, started):
        super().__init__(why)
        self.started = started


def request_bytes(method, path, body=b"", headers=()):
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}"]
    if method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    lines.extend(headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def read_response(reader):
    """(status, headers, body, keep_alive) of one response."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        raise Closed("closed before a response", bool(e.partial)) from None
    except asyncio.LimitOverrunError:
        raise Closed("response head too long", True) from None
    lines = head.decode("latin-1").split("\r\n")
    version, status = lines[0].split(" ", 2)[:2]
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    try:
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                body += await reader.readexactly(size + 2)
                if size == 0:
                    break
        else:
            body = await reader.read()
            headers["connection"] = "close"
    except asyncio.IncompleteReadError:
        raise Closed("closed in the middle of a response body", True) from None
    keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
    return int(status), headers, body, keep


async def open_connection(port):
    reader, writer = await asyncio.open_connection(HOST, port, limit=1 << 20)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


def abort(writer):
    try:
        writer.transport.abort()
    except Exception:  # noqa: BLE001 - closing is best effort
        pass


class Outcome:
    """One request: its status (None when no response came), latency in seconds, and why not."""

    __slots__ = ("status", "seconds", "error", "body", "retry_after")

    def __init__(self, status, seconds, error=None, body=b"", retry_after=None):
        self.status, self.seconds, self.error, self.body = status, seconds, error, body
        self.retry_after = retry_after


class Client:
    """Keep-alive connections to the server; concurrent callers share the idle ones."""

    def __init__(self, port):
        self.port = port
        self.idle = []
        self.retries = 0

    async def call(self, data, timeout):
        start = time.perf_counter()
        for attempt in (0, 1):
            # A retry always takes a new connection: the other idle ones may be stale too.
            reused = attempt == 0 and bool(self.idle)
            try:
                reader, writer = self.idle.pop() if reused else await open_connection(self.port)
            except OSError as e:
                return Outcome(None, time.perf_counter() - start, f"connect: {e.strerror or e}")
            try:
                # The transport buffers the whole request; reading at once sees an early answer
                # (a 503 or 413 before the body is read) without waiting for the upload.
                writer.write(data)
                status, headers, body, keep = await asyncio.wait_for(read_response(reader), timeout)
            except asyncio.TimeoutError:
                abort(writer)
                return Outcome(None, time.perf_counter() - start, "client timeout")
            except (Closed, OSError) as e:
                abort(writer)
                started = isinstance(e, Closed) and e.started
                if reused and not started:
                    # The server had closed this idle connection (keep-alive or header timeout).
                    self.retries += 1
                    continue
                why = str(e) if isinstance(e, Closed) else type(e).__name__
                return Outcome(None, time.perf_counter() - start, why)
            if keep:
                self.idle.append((reader, writer))
            else:
                abort(writer)
            retry_after = headers.get("retry-after", "")
            return Outcome(status, time.perf_counter() - start, body=body,
                           retry_after=float(retry_after) if retry_after.isdigit() else None)
        raise AssertionError("unreachable")

    def close(self):
        for _, writer in self.idle:
            abort(writer)
        self.idle.clear()


async def get(port, path, timeout=5.0):
    client = Client(port)
    try:
        return await client.call(request_bytes("GET", path), timeout)
    finally:
        client.close()


# --------------------------------------------------------------------------------------------
# Statistics and formatting


def percentile(values, p):
    """Nearest-rank percentile of `values` (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def ms(seconds):
    if seconds is None:
        return "–"
    value = seconds * 1e3
    return f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"


def summary(outcomes, elapsed):
    ok = [o.seconds for o in outcomes if o.status == 200]
    statuses = {}
    for o in outcomes:
        key = str(o.status) if o.status is not None else (o.error or "no response")
        statuses[key] = statuses.get(key, 0) + 1
    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "statuses": statuses,
        "seconds": elapsed,
        "ok_per_s": len(ok) / elapsed if elapsed > 0 else 0.0,
        "p50_s": percentile(ok, 50),
        "p99_s": percentile(ok, 99),
    }


def answered(summary):
    """A phase within capacity passed: some 200s and nothing but 200 or 503 (a 503 can race
    the release of an admission slot at the very limit of the queue: counted, not failed)."""
    return summary["ok"] > 0 and set(summary["statuses"]) <= {"200", "503"}


def not_ok(summary):
    """" (not 200: ...)" when some requests were not answered 200."""
    rest = {k: v for k, v in summary["statuses"].items() if k != "200"}
    return f" (not 200: {statuses_text(rest)})" if rest else ""


def statuses_text(statuses):
    return ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())) or "none"


# --------------------------------------------------------------------------------------------
# Load shapes


async def closed_loop(port, clients, seconds, max_requests, data, timeout, stop=None,
                      backoff=False):
    """`clients` clients, each sending the next request when the last one is answered (after
    a 503's `Retry-After` with `backoff`), until `seconds` pass, `max_requests` are sent or
    `stop` is set."""
    outcomes = []
    budget = [max_requests]
    deadline = time.perf_counter() + seconds
    pools = [Client(port) for _ in range(clients)]

    async def worker(client):
        while budget[0] > 0 and time.perf_counter() < deadline and not (stop and stop.is_set()):
            budget[0] -= 1
            outcome = await client.call(data, timeout)
            outcomes.append(outcome)
            if backoff and outcome.status == 503 and outcome.retry_after:
                await asyncio.sleep(min(outcome.retry_after, deadline - time.perf_counter()))

    start = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in pools))
    elapsed = time.perf_counter() - start
    for c in pools:
        c.close()
    return outcomes, elapsed, sum(c.retries for c in pools)


async def open_loop(port, rate, seconds, max_requests, data, timeout, max_in_flight):
    """Requests arriving at `rate` per second whatever the answers (open loop), each on an idle
    keep-alive connection or a new one; at most `max_in_flight` outstanding (beyond: counted as
    not sent). Waits for the stragglers at most `timeout` after the last arrival."""
    client = Client(port)
    outcomes, in_flight = [], set()
    not_sent = 0
    count = max(1, min(int(rate * seconds), max_requests))
    start = time.perf_counter()
    for i in range(count):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(in_flight) >= max_in_flight:
            not_sent += 1
            continue
        task = asyncio.create_task(client.call(data, timeout))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
        task.add_done_callback(lambda t: t.cancelled() or outcomes.append(t.result()))
    sending = time.perf_counter() - start
    unanswered = 0
    if in_flight:
        _, pending = await asyncio.wait(set(in_flight), timeout=timeout + 1)
        unanswered = len(pending)
        for task in pending:
            task.cancel()
    client.close()
    return outcomes, sending, not_sent, unanswered, client.retries


# --------------------------------------------------------------------------------------------
# Bad bodies


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width, height, rows=64):
    """An RGB PNG whose header declares `width x height`, with the first `rows` rows of zeros:
    a few KB that would inflate to width * height * 3 bytes if the size were believed."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    compressor = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * width)
    idat = b"".join(compressor.compress(row) for _ in range(rows)) + compressor.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def jpeg_declaring(jpeg, width, height):
    """`jpeg` with its frame header (SOF0/1/2) patched to declare `width x height`."""
    data = bytearray(jpeg)
    i = 2
    while i + 4 < len(data):
        if data[i] != 0xFF:
            break
        marker = data[i + 1]
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5 : i + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        i += 2 + length
    raise ValueError("no SOF0/1/2 marker in the JPEG")


def gzip_bomb(total_mib=1024, member_mib=16):
    """Concatenated gzip members (valid gzip) of zeros: about 1 KB per MiB inflated."""
    member = gzip.compress(b"\0" * (member_mib << 20), compresslevel=9)
    return member * (total_mib // member_mib)


def multipart(boundary, parts, close=True):
    body = b""
    for name, data in parts:
        body += (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; "
            f"filename=\"{name}.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n"
        ).encode() + data + b"\r\n"
    if close:
        body += f"--{boundary}--\r\n".encode()
    return body


def bad_bodies(jpeg, body_limit):
    """(case, body, extra headers); each must be answered 4xx."""
    octets = "Content-Type: application/octet-stream"
    garbage = random.Random(13).randbytes(64 << 10)
    gz = gzip_bomb()
    form = "Content-Type: multipart/form-data; boundary=agiqa-load"
    png, jpg = ["Content-Type: image/png"], ["Content-Type: image/jpeg"]
    return [
        ("empty body", b"", [octets]),
        ("garbage, 64 KiB", garbage, [octets]),
        ("truncated JPEG (first half)", jpeg[: len(jpeg) // 2], jpg),
        ("PNG declaring 100000x100000", png_declaring(100_000, 100_000, rows=2), png),
        ("PNG declaring 12000x12000 (144 MP)", png_declaring(12_000, 12_000), png),
        ("JPEG declaring 60000x60000", jpeg_declaring(jpeg, 60_000, 60_000), jpg),
        (f"gzip bomb: {len(gz) >> 10} KiB -> 1 GiB, Content-Encoding: gzip", gz,
         [octets, "Content-Encoding: gzip"]),
        ("multipart without a boundary", multipart("agiqa-load", [("a", jpeg)]),
         ["Content-Type: multipart/form-data"]),
        ("multipart cut off (no closing boundary)",
         multipart("agiqa-load", [("a", jpeg)], close=False)[: len(jpeg) // 2], [form]),
        ("multipart with garbage framing", garbage[:4096], [form]),
        (f"body over --body-limit ({body_limit + 1} B)", b"\0" * (body_limit + 1), [octets]),
    ]


# --------------------------------------------------------------------------------------------
# The server


class Server:
    """`agiqa serve` on a free loopback port, its output in a log file."""

    def __init__(self, binary, args, log_path):
        self.binary, self.args, self.log_path = binary, args, log_path
        self.proc = None
        self.port = None
        self.ready_path = None

    def start(self):
        with socket.socket() as s:
            s.bind((HOST, 0))
            self.port = s.getsockname()[1]
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(self.binary), "serve", "--addr", f"{HOST}:{self.port}", *self.args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # The error itself, not anyhow's backtrace of it, in the log tail.
            env={**os.environ, "RUST_LIB_BACKTRACE": "0"},
            start_new_session=True,
        )

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    async def wait_ready(self, timeout):
        """Waits for /ready (or /health on binaries without it); False if the server exits."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if not self.alive():
                return False
            for path in ("/ready", "/health"):
                answer = await get(self.port, path, timeout=2)
                if answer.status == 200:
                    self.ready_path = path
                    return True
                if answer.status != 404:
                    break  # refused (not listening yet) or 503 (warming up)
            await asyncio.sleep(0.05)
        return False

    def memory(self):
        """{"VmHWM": KiB, "VmRSS": KiB} of the server process."""
        out = {}
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in ("VmHWM", "VmRSS"):
                        out[key] = int(value.split()[0])
        except OSError:
            pass
        return out

    def stop(self):
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc is not None:
            self.log.close()

    def kill(self):
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait()

    def log_tail(self, lines=30):
        try:
            text = Path(self.log_path).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


def serve_flags(binary):
    """The `agiqa serve` flags this binary has (old ones lack the hardening flags)."""
    help_text = subprocess.run(
        [str(binary), "serve", "--help"], capture_output=True, text=True, timeout=30
    ).stdout
    wanted = ["--header-timeout", "--body-timeout", "--keep-alive", "--max-connections"]
    return {flag: flag in help_text for flag in wanted}


# --------------------------------------------------------------------------------------------
# The run


class Report:
    """Table rows and the checks that must hold."""

    def __init__(self):
        self.rows = []
        self.failures = []
        self.data = {}

    def row(self, phase, measure, value, check=""):
        self.rows.append((phase, measure, value, check))

    def must(self, phase, measure, value, holds, why):
        self.row(phase, measure, value, "ok" if holds else "FAIL")
        if not holds:
            self.failures.append(f"{phase}: {measure}: {why}")

    def table(self):
        out = ["| phase | measure | value | check |", "| --- | --- | --- | --- |"]
        out += [f"| {p} | {m} | {v} | {c} |" for p, m, v, c in self.rows]
        return "\n".join(out)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="scripts/serve-load",
        description="Load, overload, slow-client and bad-body checks of `agiqa serve` "
        "(loopback only, bounded in requests and time). Flags after `--` go to `agiqa serve`.",
    )
    p.add_argument("--model", required=True, help="the .onnx model to serve")
    p.add_argument("--bin", default=str(ROOT / "target/release/agiqa"), help="the agiqa binary")
    p.add_argument("--image", default=str(ROOT / "tests/fixtures/preprocess/inputs/photo_q90.jpg"),
                   help="JPEG sent by the load phases (also the base of the bad JPEGs)")
    p.add_argument("--quick", action="store_true",
                   help="the CI variant: short phases, fewer sockets, 30 s in all")
    p.add_argument("--clients", type=int, help="closed-loop clients in the held phase (8; quick 4)")
    p.add_argument("--queue", type=int, help="the server's --queue (default: --clients)")
    p.add_argument("--overload-factor", type=float, default=4.0,
                   help="overload arrival rate as a multiple of the held rate (4)")
    p.add_argument("--seconds", type=float, help="length of each timed phase (10; quick 2)")
    p.add_argument("--max-requests", type=int, default=20_000, help="most requests per phase")
    p.add_argument("--slow-sockets", type=int, help="half-open sockets (64; quick 16)")
    p.add_argument("--header-timeout", type=float,
                   help="the server's --header-timeout in seconds (2; quick 1), if it has one")
    p.add_argument("--request-timeout", type=float,
                   help="the server's --timeout and the client's (10; quick 5)")
    p.add_argument("--time-limit", type=float, help="hard bound on the whole run (600; quick 30)")
    p.add_argument("--json", help="also write the results as JSON to this file")
    p.add_argument("server_args", nargs="*", help="extra `agiqa serve` flags (after --)")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "clients": (8, 4),
        "seconds": (10.0, 2.0),
        "slow_sockets": (64, 16),
        "header_timeout": (2.0, 1.0),
        "request_timeout": (10.0, 5.0),
        "time_limit": (600.0, 30.0),
    }
    for name, (full, short) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, short if quick else full)
    if args.queue is None:
        args.queue = args.clients
    # Long enough to see the server's own 504.
    args.client_timeout = args.request_timeout + 2
    for name in ("clients", "queue", "slow_sockets", "max_requests"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("seconds", "header_timeout", "request_timeout", "time_limit", "overload_factor"):
        value = getattr(args, name)
        if not (value > 0 and math.isfinite(value)):
            p.error(f"--{name.replace('_', '-')} must be a positive number of seconds")
    return args


async def run(args, server, report, jpeg, flags):
    phase_timeout = args.client_timeout
    score = request_bytes("POST", "/v1/score", jpeg, ["Content-Type: image/jpeg"])
    started = time.perf_counter()
    server.start()
    if not await server.wait_ready(min(120.0, args.time_limit / 2)):
        report.must("server", "start", "did not become ready", False, "not ready")
        return
    ready_after = time.perf_counter() - started
    report.row("server", "start to ready", f"{ready_after:.2f} s ({server.ready_path})")
    port = server.port

    # Warm-up: the old binary has no warm-up batch of its own.
    await closed_loop(port, 1, min(2.0, args.seconds), 5, score, phase_timeout)

    # 1. Unloaded
    outcomes, elapsed, _ = await closed_loop(
        port, 1, args.seconds, min(args.max_requests, 300), score, phase_timeout
    )
    unloaded = summary(outcomes, elapsed)
    report.data["unloaded"] = unloaded
    report.must(
        "unloaded, 1 client", "requests · req/s · p50 · p99",
        f"{unloaded['requests']} · {unloaded['ok_per_s']:.1f} · {ms(unloaded['p50_s'])} · "
        f"{ms(unloaded['p99_s'])}" + not_ok(unloaded),
        answered(unloaded),
        f"not all answered 200 or 503 ({statuses_text(unloaded['statuses'])})",
    )

    # 2. Held
    outcomes, elapsed, _ = await closed_loop(
        port, args.clients, args.seconds, args.max_requests, score, phase_timeout
    )
    held = summary(outcomes, elapsed)
    report.data["held"] = held
    report.must(
        f"held, {args.clients} clients", "requests · req/s · p50 · p99",
        f"{held['requests']} · {held['ok_per_s']:.1f} · {ms(held['p50_s'])} · "
        f"{ms(held['p99_s'])}" + not_ok(held),
        answered(held),
        f"not all answered 200 or 503 ({statuses_text(held['statuses'])})",
    )

    # 3. Overload: an arrival rate, then a crowd of clients, at a multiple of what was held.
    if held["ok_per_s"] > 0:
        await overload(args, port, report, score, unloaded, held)
    else:
        report.must("overload", "held rate", "0 req/s", False, "no successful requests to scale")

    # 4. Slow clients: half a header each, then nothing.
    await slow_clients(args, server, report, score, flags)

    # 5. Bad bodies, each on a fresh connection.
    body_limit = args.body_limit
    for case, body, headers in bad_bodies(jpeg, body_limit):
        client = Client(port)
        data = request_bytes("POST", "/v1/score", body, headers)
        outcome = await client.call(data, phase_timeout)
        client.close()
        status = outcome.status
        message = ""
        try:
            message = json.loads(outcome.body or b"{}").get("error", "")
        except (ValueError, AttributeError):
            message = outcome.body[:60].decode("latin-1")
        value = f"{status if status is not None else outcome.error} in {ms(outcome.seconds)}"
        if message:
            value += f": {message[:70]}"
        report.data.setdefault("bad_bodies", []).append(
            {"case": case, "status": status, "error": outcome.error, "seconds": outcome.seconds,
             "message": message}
        )
        report.must("bad body", case, value.replace("|", "/"),
                    status is not None and 400 <= status < 500, "not a 4xx")
        if not server.alive():
            break

    # 6. Memory, and whether the server survived it all.
    memory = server.memory()
    report.data["memory_kib"] = memory
    if memory:
        report.row("memory", "peak RSS (VmHWM) · RSS at the end",
                   f"{memory.get('VmHWM', 0) / 1024:.0f} MiB · "
                   f"{memory.get('VmRSS', 0) / 1024:.0f} MiB")
    health = await get(port, "/health") if server.alive() else Outcome(None, 0, "exited")
    report.must("server", "alive and answering /health at the end",
                "yes" if health.status == 200 else f"no ({health.status or health.error})",
                health.status == 200, "the server died or stopped answering")


async def overload(args, port, report, score, unloaded, held):
    """Open loop at `factor` times the held rate (the benchmark's numbers), then `factor` times
    the held clients in closed loop (the crowd of the issue's first report), each waiting a
    503's `Retry-After` as a well-behaved client does (a binary without it is retried at once)."""
    factor, timeout = args.overload_factor, args.client_timeout
    rate = held["ok_per_s"] * factor
    outcomes, sending, not_sent, unanswered, retries = await open_loop(
        port, rate, args.seconds, args.max_requests, score, timeout,
        max_in_flight=max(64, 4 * args.queue * int(math.ceil(factor))),
    )
    sent = len(outcomes) + unanswered
    over = overload_summary(outcomes, sending)
    over.update(target_rate=rate, offered_rate=sent / sending if sending > 0 else 0.0,
                sent=sent, not_sent_client_cap=not_sent, unanswered=unanswered,
                reconnects=retries)
    report.data["overload_rate"] = over
    name = f"overload: {factor:g}x the held rate, queue {args.queue}"
    # The Python client cannot offer thousands of requests/s (a tiny model): say so.
    client_bound = over["offered_rate"] < 0.9 * rate or not_sent > 0
    report.row(
        name, "target · offered arrivals/s",
        f"{rate:.1f} · {over['offered_rate']:.1f} ({sent} sent"
        + (f", {not_sent} not sent: client's cap on requests in flight" if not_sent else "")
        + ")",
        "client-bound" if client_bound else "",
    )
    overload_rows(report, name, over, unanswered)
    for base_name, base in (("unloaded", unloaded), ("held", held)):
        if over["accepted_p99_s"] and base["p99_s"]:
            ratio = over["accepted_p99_s"] / base["p99_s"]
            over[f"accepted_p99_over_{base_name}_p99"] = ratio
            report.row(
                name, f"accepted p99 / {base_name} p99", f"{ratio:.2f}x",
                ("≤ 2x" if ratio <= 2 else "> 2x") if base_name == "unloaded" else "",
            )

    crowd = int(math.ceil(args.clients * factor))
    outcomes, elapsed, _ = await closed_loop(
        port, crowd, args.seconds, args.max_requests, score, timeout, backoff=True
    )
    over = overload_summary(outcomes, elapsed)
    over["clients"] = crowd
    report.data["overload_clients"] = over
    overload_rows(report, f"overload: {crowd} clients, queue {args.queue}", over, 0)


def overload_summary(outcomes, elapsed):
    accepted = [o.seconds for o in outcomes if o.status == 200]
    refused = [o.seconds for o in outcomes if o.status == 503]
    statuses = summary(outcomes, elapsed)["statuses"]
    return {
        "seconds": elapsed,
        "ok": len(accepted),
        "refused_503": len(refused),
        "other": {k: v for k, v in statuses.items() if k not in ("200", "503")},
        "refused_p50_s": percentile(refused, 50),
        "refused_p99_s": percentile(refused, 99),
        "accepted_p50_s": percentile(accepted, 50),
        "accepted_p99_s": percentile(accepted, 99),
        "accepted_per_s": len(accepted) / elapsed if elapsed > 0 else 0.0,
    }


def overload_rows(report, name, over, unanswered):
    other = over["other"]
    report.row(
        name, "200 · 503 · other",
        f"{over['ok']} · {over['refused_503']} · {statuses_text(other) if other else 0}"
        + (f" · {unanswered} unanswered" if unanswered else ""),
        "info",
    )
    p99 = over["refused_p99_s"]
    report.row(
        name, "503 latency p50 · p99", f"{ms(over['refused_p50_s'])} · {ms(p99)}",
        "no 503" if p99 is None else ("p99 ≤ 50 ms" if p99 <= 0.05 else "p99 > 50 ms"),
    )
    report.row(
        name, "accepted req/s · p50 · p99",
        f"{over['accepted_per_s']:.1f} · {ms(over['accepted_p50_s'])} · "
        f"{ms(over['accepted_p99_s'])}",
    )


async def slow_clients(args, server, report, score, flags):
    port = server.port
    supported = flags["--header-timeout"]
    timeout = args.header_timeout
    window = 2 * timeout + 2
    name = f"slow clients: {args.slow_sockets} half-open"
    name += f", --header-timeout {timeout:g} s" if supported else " (no --header-timeout)"
    sockets = []
    for _ in range(args.slow_sockets):
        try:
            reader, writer = await open_connection(port)
        except OSError as e:
            report.must(name, "open", f"connect failed: {e}", False, "could not connect")
            break
        writer.write(b"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
        sockets.append((time.perf_counter(), reader, writer))

    async def watch(opened, reader):
        try:
            while await reader.read(1 << 16):
                pass
        except OSError:
            pass
        return time.perf_counter() - opened

    watchers = [asyncio.create_task(watch(opened, reader)) for opened, reader, _ in sockets]
    stop = asyncio.Event()
    normal = asyncio.create_task(
        closed_loop(port, 2, window, args.max_requests, score, args.client_timeout, stop)
    )
    done, pending = await asyncio.wait(watchers, timeout=window) if watchers else (set(), set())
    stop.set()
    outcomes, elapsed, _ = await normal
    for task in pending:
        task.cancel()
    for _, _, writer in sockets:
        abort(writer)
    closed = sorted(t.result() for t in done)
    data = {
        "sockets": len(sockets),
        "closed": len(closed),
        "closed_after_s": {"min": percentile(closed, 0), "p50": percentile(closed, 50),
                           "max": percentile(closed, 100)},
        "window_s": window,
        "normal": summary(outcomes, elapsed),
    }
    report.data["slow_clients"] = data
    value = f"{len(closed)} of {len(sockets)} closed within {window:g} s"
    if supported:
        report.must(name, "closed by the server", value, len(closed) == len(sockets),
                    "half-open sockets left open past twice the header timeout")
    else:
        report.row(name, "closed by the server", value, "not supported")
    if closed:
        report.row(name, "closed after min · p50 · max",
                   " · ".join(f"{data['closed_after_s'][k]:.2f} s" for k in ("min", "p50", "max")))
    if supported:
        metrics = await get(port, "/metrics")
        counted = 0.0
        for line in (metrics.body or b"").decode(errors="replace").splitlines():
            if line.startswith('agiqa_connections_closed_total{reason="header_timeout"}'):
                counted = float(line.split()[-1])
        data["counted_in_metrics"] = counted
        report.must(name, "counted in /metrics (header_timeout)", f"{counted:g}",
                    counted >= len(closed), "fewer closes counted than seen")
    normal_summary = data["normal"]
    report.must(
        name, "normal requests meanwhile (2 clients): n · p99",
        f"{normal_summary['requests']} · {ms(normal_summary['p99_s'])}" + not_ok(normal_summary),
        answered(normal_summary),
        f"not all answered 200 or 503 ({statuses_text(normal_summary['statuses'])})",
    )


def main(argv):
    args = parse_args(argv)
    binary = Path(args.bin)
    if not binary.is_file():
        sys.exit(f"serve-load: no binary at {binary}: build it with `cargo build --release "
                 "-p agiqa-runtime --features cli --bin agiqa`, or give --bin")
    jpeg = Path(args.image).read_bytes()
    flags = serve_flags(binary)
    args.body_limit = max(8 << 20, 2 * len(jpeg))
    server_args = [
        "--model", args.model,
        "--queue", str(args.queue),
        "--body-limit", str(args.body_limit),
        "--timeout", f"{args.request_timeout:g}",
    ]
    if flags["--header-timeout"]:
        server_args += ["--header-timeout", f"{args.header_timeout:g}"]
    server_args += args.server_args
    report = Report()
    report.data["config"] = {
        "binary": str(binary), "model": args.model, "image": args.image, "quick": args.quick,
        "server_args": server_args, "serve_flags": flags, "clients": args.clients,
        "queue": args.queue, "seconds": args.seconds, "cpus": os.cpu_count(),
    }
    log = tempfile.NamedTemporaryFile(prefix="serve-load-", suffix=".log", delete=False)
    log.close()
    server = Server(binary, server_args, log.name)

    def out_of_time():
        server.kill()
        print(f"serve-load: the time limit of {args.time_limit:g} s ran out; server killed "
              f"(log: {log.name})", file=sys.stderr, flush=True)
        os._exit(124)

    def terminated(*_):
        server.kill()
        os._exit(143)

    signal.signal(signal.SIGTERM, terminated)
    watchdog = threading.Timer(args.time_limit, out_of_time)
    watchdog.daemon = True
    watchdog.start()
    start = time.perf_counter()
    try:
        asyncio.run(run(args, server, report, jpeg, flags))
    finally:
        died = server.proc is not None and server.proc.poll() is not None
        code = server.proc.returncode if died else None
        server.stop()
        watchdog.cancel()
    if died:
        report.must("server", "exit", f"exited by itself with status {code}", False, "server died")
    wall = time.perf_counter() - start
    load = (os.getloadavg()[0], os.getloadavg()[2]) if hasattr(os, "getloadavg") else (0, 0)
    report.data["loadavg_1m_15m_at_end"] = load
    print(f"\nagiqa serve load ({binary}; model {args.model}; {os.cpu_count()} CPUs shared by "
          f"client and server; load average {load[0]:.1f} (1 min), {load[1]:.1f} (15 min) at "
          f"the end; {wall:.1f} s)\n")
    print(report.table())
    report.data["wall_s"] = wall
    report.data["failures"] = report.failures
    if args.json:
        Path(args.json).write_text(json.dumps(report.data, indent=2) + "\n")
    if report.failures:
        print("\nserve-load: FAILED:\n  " + "\n  ".join(report.failures), file=sys.stderr)
        print(f"server log ({log.name}), last lines:\n{server.log_tail()}", file=sys.stderr)
        return 1
    os.unlink(log.name)
    print(f"\nserve-load: every check held ({wall:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
