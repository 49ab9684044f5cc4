"""Published AlexNet weights as this project's two-tower parameters.

`python main.py --config=configs/alexnet.py:caffe --mode=import
--weights=PATH --workdir=DIR` reads Caffe's bvlc_alexnet (a .caffemodel, in
the V1 or the current format, `caffe.py`) or its widely used NumPy port (a
pickled .npy dict, read without running code, `npy.py`), checks every
shape, maps the grouped layers onto the towers (`layout.py`) and writes a
step-0 checkpoint that --mode=eval scores and training starts from
(`checkpoint.py`).
"""
