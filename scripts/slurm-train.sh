#!/bin/bash
# loraqa on several machines under Slurm: one torchrun agent per machine, c10d rendezvous on the
# first machine, the run folder on a filesystem every machine sees. Submit with `sbatch`; edit the
# #SBATCH lines and the variables below. A worker that dies is restarted by torchrun and resumes
# from the newest checkpoint; a lost machine ends the job, and --requeue (or submitting the same
# script again) resumes it. docs/machines.md says more.
#SBATCH --job-name=loraqa
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one torchrun agent per machine
#SBATCH --gpus-per-node=1            # GPUs: NCCL; drop it (and set PROCS_PER_NODE=1) for CPU machines: gloo
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --requeue                    # a lost machine: Slurm runs the job again, and it resumes
set -euo pipefail

RUN_DIR=${RUN_DIR:-$HOME/loraqa-runs/mine}         # shared: every machine reads and writes it
MODEL=${MODEL:-HuggingFaceTB/SmolLM2-135M-Instruct} # on each machine, or on the shared filesystem
TRAIN_FILE=${TRAIN_FILE:-$HOME/data/train.jsonl}
EVAL_FILE=${EVAL_FILE:-$HOME/data/dev.jsonl}
PROCS_PER_NODE=${PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${PORT:-29500}

# a fresh rendezvous store every round: torchrun's shared store keeps the last round's keys, and a
# restarted worker can read its lost peer's old address from them
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

# --batch-size is the global batch: each of the NNODES x PROCS_PER_NODE processes takes its share
srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_NNODES" --nproc_per_node "$PROCS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$HEAD:$PORT" --rdzv-id "loraqa-$SLURM_JOB_ID" \
    --max-restarts 3 \
    -m loraqa.cli train --config recommended --model "$MODEL" \
    --train-file "$TRAIN_FILE" --eval-file "$EVAL_FILE" --save-steps 50 --output-dir "$RUN_DIR" "$@"
