"""A silo farm: many real silo agents hosted in a few OS processes, for benchmarks and scale tests.

    python -m bench.farm --cpu-log farm.jsonl [--control-dir DIR] SILO_TOML...

runs one silo agent per config file, each on a thread of that process (`__main__.py`), until all
of them have stopped (the coordinator said the federation finished, a silo was cut, a signal).
bench/_federation.py starts farms instead of one process per silo when asked (`bench/round.py
--farm`).

What each farmed silo has of its own, as on its own machine: its config file, certificate and
private key, its mTLS gRPC channel and stream (`silo_agent.transport.connection.Link`), its
secure-aggregation session, state directory (with its `agent.lock` flock) and submission journal,
and its ledger. Each one IS the agent: `silo_agent.runtime.runner.SiloRunner`, built as
`silofed-silo run` builds it (config, state-dir lock, pre-flight check of its certificate, task,
data); no protocol code is re-implemented here.

What they share, unlike separate machines: the process's share of the machine's cores, the
interpreter and its GIL, gRPC's C core, the task's module (one `TASK` object; the no-op task keeps
no state in it), torch (its intra-op pool set to ONE thread: one pool per silo, each the size of
the machine, would fight over the cores) and logging. What `silofed-silo run` does once per
process the farm does once for all its silos: logging is set up once (each line names its silo),
the training progress bar stays off, and SIGTERM/SIGINT stop every silo of the farm.

Ending silos. SIGKILL of a farm process ends all its silos at once: the kernel closes their
sockets, as when machines lose power. One silo is cut by creating `<control-dir>/cut-<name>`
(`name` as in its `[silo] name`): the farm calls that silo's `request_stop`, which closes its
stream and channel, so the coordinator sees its connection end and the silo takes no further
part; `<control-dir>/cut-<name>.done` then exists.

CPU accounting (`cpu_log.py`; the attribution is `owners.py`). A silo's CPU seconds are those of
every thread working for it: its runner thread and every thread a thread of that silo started
(training and masking, the deadline watch, certificate renewal, and gRPC's Python threads for
its channel: the request iterator's consumer and the channel's polling thread, in which gRPC's
core does the TLS and HTTP/2 work of the calls it polls). What no silo thread accounts for
(the process's total minus the silos' sum: threads of gRPC's core, the sampler, the interpreter's
own) is reported separately as shared.

Why round figures still hold for separate machines: the coordinator is its own real process, and
every silo has its own real mTLS connection to it, so what is measured on the coordinator (round
and phase times from its round log, its peak memory and CPU) is what it does with N machines
whose silos are as slow to answer and to read their streams as the farmed ones. Per-silo CPU
seconds are counted on the silo's own threads, not divided from a process total, so they are the
silo's own work (each thread's own CPU-time clock: time a thread waits for the GIL or a core is
not counted). What the farm changes is wall-clock time: the N silos' work queues for the
machine's cores (and, within one farm, for the GIL), so a farmed round is slower than the same
round with a machine per silo, never faster; and farmed silos drain their streams more slowly,
like silos on slow links, so the coordinator holds more outbound data at once than with fast
readers (its peak memory is the slow-reader case).
"""
