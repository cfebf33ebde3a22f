"""Where the review page lives: every route, template link and redirect is built from these."""
PREFIX = "/review"
HOME = PREFIX + "/studies"  # the reading room opens on the study list: the study is the unit of clinical work
