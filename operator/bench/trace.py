"""``agentlat trace``: the proposal's bpftrace snippets (IRQ, softirq, wakeup-to-run, epoll and
io_uring gate time), run for a bounded time when bpftrace is installed. Each stage keeps its own maps,
so any combination compiles (bpftrace rejects one map used with different key types)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

from agentlat.operator.model import errors
from agentlat.operator.observe import wakeups

SCRIPTS = {
    "irq": """
tracepoint:irq:irq_handler_entry { @irq_start[args->irq] = nsecs; }
tracepoint:irq:irq_handler_exit /@irq_start[args->irq]/ {
  @irq_us[args->irq] = hist((nsecs - @irq_start[args->irq]) / 1000); delete(@irq_start[args->irq]); }""",
    "softirq": """
tracepoint:irq:softirq_entry { @softirq_start[cpu, args->vec] = nsecs; }
tracepoint:irq:softirq_exit /@softirq_start[cpu, args->vec]/ {
  @softirq_us[args->vec] = hist((nsecs - @softirq_start[cpu, args->vec]) / 1000);
  delete(@softirq_start[cpu, args->vec]); }""",
    "wakeup": """
tracepoint:sched:sched_wakeup { @woken[args->pid] = nsecs; }
tracepoint:sched:sched_switch /@woken[args->next_pid]/ {
  @wake_to_run_us[cpu] = hist((nsecs - @woken[args->next_pid]) / 1000); delete(@woken[args->next_pid]); }""",
    "epoll": """
tracepoint:syscalls:sys_enter_epoll_wait { @epoll_start[tid] = nsecs; }
tracepoint:syscalls:sys_exit_epoll_wait /@epoll_start[tid]/ {
  @epoll_wait_us[comm] = hist((nsecs - @epoll_start[tid]) / 1000); delete(@epoll_start[tid]); }""",
    "io_uring": """
tracepoint:syscalls:sys_enter_io_uring_enter { @io_uring_start[tid] = nsecs; }
tracepoint:syscalls:sys_exit_io_uring_enter /@io_uring_start[tid]/ {
  @io_uring_enter_us[comm] = hist((nsecs - @io_uring_start[tid]) / 1000); delete(@io_uring_start[tid]); }""",
}


def script(what: list[str]) -> str:
    return "\n".join(SCRIPTS[name].strip() for name in what) + "\n"


def run(stages: str, duration: float, *, print_script: bool = False) -> int:
    """Trace the comma-separated ``stages`` for ``duration`` seconds; bpftrace prints the histograms."""
    what = [name for name in stages.split(",") if name]
    unknown = sorted(set(what) - set(SCRIPTS))
    if unknown or not what:
        named = ", ".join(unknown) or "(none)"
        raise errors.single("--what", "", f"unknown stage {named}; known: {', '.join(SCRIPTS)}")
    if not duration > 0:  # also NaN
        raise errors.single("--duration", "", f"must be a positive number of seconds, not {duration:g}")
    program = script(what)
    if print_script:
        sys.stdout.write(program)
        return 0
    reason = wakeups.unavailable_reason()
    if reason:
        print(f"agentlat: cannot trace: {reason}. Without bpftrace, `agentlat observe` and `agentlat bench` "
              "report coarse figures from /proc; `agentlat trace --print-script` shows the program to run elsewhere.",
              file=sys.stderr)
        return 1
    with wakeups.spawn(["-e", program], stdout=None) as proc:
        assert proc.stderr is not None
        relay = threading.Thread(target=wakeups.filter_stderr, args=(proc.stderr, sys.stderr.write), daemon=True)
        relay.start()
        try:
            proc.wait(timeout=duration)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)  # bpftrace prints its histograms on SIGINT
            proc.wait(timeout=30)
        relay.join(timeout=5)
    return proc.returncode if proc.returncode not in (-signal.SIGINT, 130) else 0
