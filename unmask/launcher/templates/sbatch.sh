#!/bin/bash
# {{title}}
# Rendered by `unmask launch --slurm`; change the `unmask launch` arguments rather than this file.
{{directives}}
#
# Requeue: {{signal_seconds}} s before the time limit SLURM sends SIGUSR1 to every process of the step
# (not to this shell: no "B:"). {{signal_path}}
# Training saves its state and exits with {{requeue_code}}; this script then requeues the job, which resumes
# from the checkpoint. --open-mode=append keeps every attempt's output in one log.

# Collective environment (launch.env in the config); a value already set in the job's environment wins.
{{exports}}

# --kill-on-bad-exit: one task failing ends the step at once, instead of its peers waiting in a collective.
srun --kill-on-bad-exit=1 {{srun_command}}
rc=$?
if [ "$rc" -eq {{requeue_code}} ]; then
  echo "unmask: job $SLURM_JOB_ID saved its state (exit $rc); requeueing (restart count ${SLURM_RESTART_COUNT:-0})"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
