"""``agentlat trace``: the proposal's bpftrace snippets (IRQ, softirq, wakeup-to-run, epoll and
io_uring gate time), run for a bounded time when bpftrace is installed."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys

from agentlat.operator.model import errors

SCRIPTS = {
    "irq": """
tracepoint:irq:irq_handler_entry { @start[args->irq] = nsecs; }
tracepoint:irq:irq_handler_exit /@start[args->irq]/ {
  @irq_us[args->irq] = hist((nsecs - @start[args->irq]) / 1000); delete(@start[args->irq]); }""",
    "softirq": """
tracepoint:irq:softirq_entry { @start[cpu, args->vec] = nsecs; }
tracepoint:irq:softirq_exit /@start[cpu, args->vec]/ {
  @softirq_us[args->vec] = hist((nsecs - @start[cpu, args->vec]) / 1000); delete(@start[cpu, args->vec]); }""",
    "wakeup": """
tracepoint:sched:sched_wakeup { @woken[args->pid] = nsecs; }
tracepoint:sched:sched_switch /@woken[args->next_pid]/ {
  @wake_to_run_us[cpu] = hist((nsecs - @woken[args->next_pid]) / 1000); delete(@woken[args->next_pid]); }""",
    "epoll": """
tracepoint:syscalls:sys_enter_epoll_wait { @start[tid] = nsecs; }
tracepoint:syscalls:sys_exit_epoll_wait /@start[tid]/ {
  @epoll_wait_us[comm] = hist((nsecs - @start[tid]) / 1000); delete(@start[tid]); }""",
    "io_uring": """
tracepoint:syscalls:sys_enter_io_uring_enter { @start[tid] = nsecs; }
tracepoint:syscalls:sys_exit_io_uring_enter /@start[tid]/ {
  @io_uring_enter_us[comm] = hist((nsecs - @start[tid]) / 1000); delete(@start[tid]); }""",
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
    program = script(what)
    if print_script:
        sys.stdout.write(program)
        return 0
    binary = shutil.which("bpftrace")
    if binary is None:
        print("agentlat: bpftrace is not installed, so `agentlat trace` cannot run (Debian/Ubuntu: apt-get install "
              "bpftrace). Without it, `agentlat bench` still attributes latency from /proc counters; "
              "`agentlat trace --print-script` shows the program to run elsewhere.", file=sys.stderr)
        return 1
    with subprocess.Popen([binary, "-e", program]) as proc:
        try:
            proc.wait(timeout=duration)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)  # bpftrace prints its histograms on SIGINT
            proc.wait(timeout=30)
    return proc.returncode if proc.returncode not in (-signal.SIGINT, 130) else 0
