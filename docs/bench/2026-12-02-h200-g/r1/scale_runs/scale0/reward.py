
def reward(sample):
    # a dense signal (share of even token ids): groups get distinct rewards, so every step trains
    ids = sample.response_ids
    return sum(t % 2 == 0 for t in ids) / max(len(ids), 1)
