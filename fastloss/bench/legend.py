"""The legend of the ``fastloss bench`` table, as plain text.

Its own module so that ``fastloss bench --help`` shows it without importing
the kernels. The thresholds it quotes are those of
:func:`fastloss.bench.machine.noise_warnings`.
"""

#: What the columns of :func:`fastloss.bench.runner.format_table` mean
#: (``fastloss bench --help`` shows it).
LEGEND = """\
columns (one block per case; every provider timed in the same run, same threads):
  median ms, min ms  median and minimum of the timed calls (after the warm-up)
  rounds      number of timed calls
  GB/s        bytes moved / median: the inputs read once (logits; logits and
              probabilities; student and teacher; prediction and target), plus
              the gradient written once for fwd+bwd (1 GB = 1e9 bytes)
  % bw        GB/s / the bandwidth measured at the start of the run: the read
              bandwidth (parallel sum) for a forward pass, the copy bandwidth
              (np.copyto, read + write) for fwd+bwd
  floor ms    the least time the case can take here: max(bytes moved / that
              bandwidth, exp evaluations / exp rate); cross-entropy (class-index
              or probability targets) needs one exp per logit, distillation two
              per element pair (student and teacher), MSE none. The exp rate
              is the faster of two measured in the run, fastloss's own exp_f32
              in a numba loop and numpy's float32 np.exp on as many threads;
              the header line names the one used (on the project's machine:
              fastloss exp_f32, ~3x numpy's). A provider that returns a fresh
              gradient (fastloss-alloc, torch, ...) also pays the first touch
              of its pages (faults and zeroing, measured): its floor adds it.
              Every ceiling is the best of calibration rounds repeated until
              it settles; "±" in the header is its spread over the rounds
  % floor     floor / median: 100% means the case ran at the machine's limit
  x fastest   median / the fastest median of the case (1.00 = fastest)
  x peer      median / the fastest median among the other implementations (all
              fastloss-* rows are one); below 1 = faster than every peer
  vs torch    speedup vs torch eager: torch's median / median (higher is
              better; 1.00x on the torch row, - without a torch row)
warnings (printed above the table): the machine was busy (1-minute load average
  minus this process's estimated share of it, at the start or end of the run,
  above the cores the run leaves free, cores - threads, by more than 0.5), or the ceilings
  are inconsistent (read bandwidth below copy bandwidth, or a ceiling's fastest
  repeat more than 10% above its median)."""

#: What the columns of ``fastloss bench --op torch-step``
#: (:func:`fastloss.bench.torch_step.format_table`) mean.
TORCH_STEP_LEGEND = """\
--op torch-step columns (one block per case; providers timed interleaved, one call of each
per round, same threads; a step is logits = hidden @ W.T, the loss, backward to hidden and W):
  median ms, min ms  median and minimum of the timed steps (after the warm-up)
  vs torch    torch eager's median / median (higher is better; 1.00x on the torch row)
  loss ms     median - the head-only median: the time the loss adds to the products
  loss share  loss ms / median: the loss's share of the step (for the fused *-lce rows,
              the time beyond the unfused products)
  share x     torch eager's loss share / this row's: how many times smaller the loss's
              share of the step is than with F.cross_entropy
  peak MB     resident memory one step added at its peak (1 MB = 1e6 bytes), the
              gradients of hidden and W included, measured in a child process per
              provider (VmHWM after resetting it through /proc/self/clear_refs)
  loss        the loss the provider computed (every provider: the same loss)
  head-only   the baseline: F.linear(hidden, W).backward(G) with a fixed upstream
              gradient G, the products without a loss
then: the adapter's overhead, fastloss.torch.cross_entropy against the numpy call
  fastloss.cross_entropy(_with_grad) at 64x1000 float32 (forward, and fwd+bwd with
  backward()), medians of interleaved calls; target: under 50 us added per call."""
