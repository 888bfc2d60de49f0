"""Error-driven rounds: the trained classifier's weak spots drive more generation (``rounds:``).

``weak_spots.py`` measures them, ``targeted.py`` turns them into generation requests (a source
stage a round), ``leak.py`` keeps the dev set's texts out of training, ``stages.py`` holds the
weak-spot stage, the rounds' stage list and the stopping rule.
"""
