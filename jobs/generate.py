"""Ray job entry point for the generate job.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/generate.py --config examples/sentiment.yaml

``ray job submit`` sets RAY_ADDRESS, so the job joins the cluster instead of starting Ray.
"""

import sys

from anyclf_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
