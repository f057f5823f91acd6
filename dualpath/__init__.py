"""The names every package of the lab shares and nothing else: the error base class and the
exit statuses it carries (errors). It imports nothing of the lab."""
