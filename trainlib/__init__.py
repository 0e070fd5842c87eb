"""train.py's parts: the training engine, process placement and rendezvous, and the files a run writes."""
