"""Which workers run side by side (bench/admission.py), on the figures that motivated each check."""

from pocketsd.bench.admission import admission_units, fits_another, fits_unit

GB = 1e9
BOX = 25.3 * GB  # this project's bench machine


def test_the_first_worker_of_a_group_always_starts():
    assert fits_another([], largest=30 * GB, available=1 * GB, total=BOX)


def test_plenty_of_memory_admits_another():
    assert fits_another([3 * GB, 3 * GB], largest=3 * GB, available=18 * GB, total=BOX)


def test_mem_available_below_the_margin_refuses():
    assert not fits_another([4 * GB], largest=4 * GB, available=8 * GB, total=BOX)


def test_page_cache_counted_as_available_does_not_admit_a_third_512_worker():
    # SD 1.5 at 512²: two pocketsd-onnxruntime workers at ~7 GB each after warm-up, MemAvailable still ample because
    # their mapped weights are page cache; a third would push their weights out between calls
    assert not fits_another([7 * GB, 7 * GB], largest=7 * GB, available=16 * GB, total=BOX)
    assert fits_another([7 * GB], largest=7 * GB, available=16 * GB, total=BOX)


def test_the_largest_worker_of_an_earlier_group_still_counts():
    assert not fits_another([2 * GB], largest=9 * GB, available=15 * GB, total=BOX)
    assert fits_another([2 * GB], largest=2 * GB, available=15 * GB, total=BOX)


def test_unknown_memory_figures_skip_their_check():
    assert fits_another([7 * GB, 7 * GB], largest=7 * GB, available=None, total=None)
    assert not fits_another([7 * GB, 7 * GB], largest=7 * GB, available=None, total=BOX)


def test_a_chunked_contender_and_its_unchunked_twin_are_one_unit():
    names = ["pocketsd-onnxruntime", "onnxruntime", "pocketsd-onnxruntime-1chunk", "pocketsd-openvino-1chunk",
             "openvino"]
    assert admission_units(names) == [[0, 2], [1], [3], [4]]


def test_a_unit_of_two_needs_room_for_two():
    # one 7 GB worker running: a single newcomer fits, a chunked/unchunked pair (counted 7 GB each) does not
    assert fits_unit([7 * GB], largest=7 * GB, members=1, available=16 * GB, total=BOX)
    assert not fits_unit([7 * GB], largest=7 * GB, members=2, available=16 * GB, total=BOX)
    # a fresh group always starts its first worker, even where a pair counted as large as the largest would not fit
    # (the bench once waited forever for room that could not come)
    assert fits_unit([], largest=9 * GB, members=2, available=23 * GB, total=BOX)
    assert fits_unit([], largest=30 * GB, members=2, available=1 * GB, total=BOX)
