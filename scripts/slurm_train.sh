#!/bin/bash
# Multi-node data-parallel training of one method notebook with SLURM: the same notebook and parameters
# as on a laptop, plus devices/num_nodes. Every task runs the driver; Lightning joins them into one DDP group
# (NCCL on GPUs, gloo on CPUs) from SLURM's environment; only rank 0 keeps results/<dataset>/<method>/.
# The repository (with its .venv) and the data must be on a file system every node sees.
#
#   sbatch scripts/slurm_train.sh heatmap_unet hamedan-ceph      # 2 nodes x 4 GPUs, global batch 4 x 8
#
#SBATCH --job-name=lmlib-ddp
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
set -euo pipefail
METHOD=${1:-heatmap_unet}
DATASET=${2:-hamedan-ceph}
cd "${SLURM_SUBMIT_DIR}"
srun .venv/bin/python -m lmlib.run --dataset "${DATASET}" --profile full --only "${METHOD}" --device cuda \
    --set devices="${SLURM_NTASKS_PER_NODE}" --set num_nodes="${SLURM_NNODES}"
