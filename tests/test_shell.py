"""snapcoord/shell.py, the one way snapcoord starts local processes, with real processes:
streaming stdin from a file and stdout to a consumer, a consumer that fails (a full store),
timeouts and interrupts that kill the whole process group, output that does not end."""

from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import threading
import time

import pytest

from snapcoord import shell


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def gone_soon(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_stdin_and_a_source_stream_through_to_the_consumer_in_order() -> None:
    data = os.urandom(3 * shell.CHUNK + 12345)  # several chunks, not a multiple of one
    received: list[bytes] = []
    result = shell.stream(
        ["cat"], timeout=60, stdin=b"prefix:", source=io.BytesIO(data), consume=received.append
    )
    assert result.ok and result.stdout == b""  # streamed, not collected
    assert b"".join(received) == b"prefix:" + data


def test_without_a_consumer_stdout_is_collected_and_stderr_kept_apart() -> None:
    result = shell.stream(["sh", "-c", "cat; echo oops >&2; exit 3"], timeout=60, stdin=b"in\n")
    assert (result.returncode, result.stdout, result.stderr) == (3, b"in\n", b"oops\n")
    assert not result.ok and result.error_text() == "oops"


def test_without_stdin_the_command_reads_end_of_file() -> None:
    result = shell.stream(["sh", "-c", "wc -c"], timeout=60)
    assert result.ok and result.stdout.strip() == b"0"


def test_a_failing_consumer_kills_the_writer_by_sigpipe_and_its_error_wins() -> None:
    """A full store: the command must not stream on into nothing; the store's error is raised."""
    pids: list[int] = []

    def consume(chunk: bytes) -> None:
        if not pids:
            pids.append(int(chunk.split(b"\n", 1)[0]))
        raise OSError(28, "No space left on device")

    started = time.monotonic()
    with pytest.raises(OSError, match="No space left"):
        # Endless output; the shell reports the writer's PID and waits for it.
        shell.stream(
            ["sh", "-c", "yes & echo $!; wait $!; echo status $? >&2"],
            timeout=60,
            consume=consume,
        )
    assert time.monotonic() - started < 30
    assert pids and not alive(pids[0])


def test_a_command_that_stops_reading_stdin_ends_the_feeding_quietly() -> None:
    endless = io.BytesIO(b"x" * (8 * shell.CHUNK))
    result = shell.stream(["head", "-c", "10"], timeout=60, source=endless)
    assert result.ok and result.stdout == b"x" * 10


def test_a_timeout_kills_the_whole_process_group() -> None:
    result = shell.stream(["sh", "-c", "sleep 60 & echo $!; wait"], timeout=1)
    assert result.timed_out and not result.ok
    assert 0.9 < result.seconds < 30
    child = int(result.stdout.split()[0])
    assert gone_soon(child), "the command's child outlived the timeout"


def test_an_interrupt_kills_the_process_group_and_is_raised() -> None:
    """Ctrl-C while a stream runs: nothing is left streaming behind snapcoord's back."""
    pids: list[int] = []
    main = threading.get_ident()

    def consume(chunk: bytes) -> None:
        pids.append(int(chunk.split()[0]))
        signal.pthread_kill(main, signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        shell.stream(["sh", "-c", "sleep 60 & echo $!; wait"], timeout=60, consume=consume)
    assert pids and gone_soon(pids[0])


def test_output_that_does_not_end_after_the_command_exited_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A process outside the group (setsid) holding stdout: the consumer may not have seen all
    of it, so the stream must not pass as complete."""
    monkeypatch.setattr(shell, "DRAIN_SECONDS", 0.5)
    pids: list[int] = []

    def consume(chunk: bytes) -> None:
        pids.extend(int(word) for word in chunk.split())

    try:
        with pytest.raises(shell.OutputNotEnded, match="did not end"):
            shell.stream(
                ["sh", "-c", "setsid sleep 30 </dev/null 2>/dev/null & echo $!"],
                timeout=60,
                consume=consume,
            )
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)


def test_execute_and_stream_log_the_command_with_secrets_masked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="snapcoord.shell")
    shell.execute(["echo", "pw=hunter2"], timeout=30, secrets=["hunter2"])
    shell.stream(["echo", "token=s3cret"], timeout=30, secrets=["s3cret"])
    text = caplog.text
    assert "echo pw=" in text and "echo token=" in text
    assert "hunter2" not in text and "s3cret" not in text


def test_spawn_starts_a_process_group_of_its_own_that_kill_group_ends() -> None:
    process = shell.spawn(
        ["sh", "-c", "sleep 60 & echo $!; wait"], stdin=None, stdout=subprocess.PIPE
    )
    try:
        assert os.getpgid(process.pid) == process.pid != os.getpgid(0)
        assert process.stdout is not None
        child = int(process.stdout.readline())
    finally:
        shell.kill_group(process)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert gone_soon(child)
    shell.kill_group(process)  # a group that is gone already: no error
    for pipe in (process.stdout, process.stderr):
        assert pipe is not None
        pipe.close()
