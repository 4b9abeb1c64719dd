"""The trainer's command line with one fault injected at a chosen step, for the
reliability tests (tests/test_resume.py); it runs as a separate process.

    FAULT=kill FAULT_STEP=7 python -m tests.fault_runner --config ... --workdir ...

FAULT: 'kill' (SIGKILL: the process vanishes mid-run), 'term' / 'int' (SIGTERM /
SIGINT, as a preemption, a scheduler or Ctrl-C sends; then FAULT_PAUSE seconds of
sleep), 'pause' (writes
FAULT_DIR/paused, then waits until FAULT_DIR/release exists: a trainer that is busy
while another process uses its workdir). The fault fires right after the trainer logs
the training metrics of FAULT_STEP.
"""

import os
import signal
import sys
import time

from nfnet_jax import metrics, train


def main():
  fault, at = os.environ['FAULT'], int(os.environ['FAULT_STEP'])
  original = metrics.MetricsLogger.write

  def write(self, step, values):
    original(self, step, values)
    if step != at or 'loss' not in values:
      return
    if fault == 'kill':
      os.kill(os.getpid(), signal.SIGKILL)
    elif fault in ('term', 'int'):
      os.kill(os.getpid(), signal.SIGTERM if fault == 'term' else signal.SIGINT)
      # A multi-host job agrees on the step to stop at through its coordinator; a
      # pause here gives that agreement time to land before the run ends.
      time.sleep(float(os.environ.get('FAULT_PAUSE', '0')))
    elif fault == 'pause':
      folder = os.environ['FAULT_DIR']
      open(os.path.join(folder, 'paused'), 'w').close()
      while not os.path.exists(os.path.join(folder, 'release')):
        time.sleep(0.05)
    else:
      raise ValueError(f'unknown FAULT={fault!r}')

  metrics.MetricsLogger.write = write
  train.run_main()


if __name__ == '__main__':
  sys.exit(main())
