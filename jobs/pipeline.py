"""Ray job entry point for the whole job: generate → dedup → train and evaluate.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/pipeline.py --config examples/sentiment.yaml

``ray job submit`` sets RAY_ADDRESS, so the job joins the cluster instead of starting Ray. Each
stage skips itself when its complete output for the run id is already there, so resubmitting a
failed job resumes it.
"""

import sys

from anyclf_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
