from setuptools import find_packages, setup

setup(
    name="caffe-compress",
    version="0.1.0",
    description="Offline, on-device compression of Caffe models for OpenCV DNN by SVD and CP decomposition",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["caffe_compress", "caffe_compress.*", "gendernet"]),
    # Only what the package imports. The ranges are the ones `make compat` runs the suite with: the
    # oldest (numpy 1.26.4, protobuf 4.21.12 -- the first with the fast upb backend, OpenCV 4.5.5.64)
    # and the newest releases.
    install_requires=[
        "numpy>=1.26",
        "protobuf>=4.21,<8",
        # OpenCV 5 removed cv2.dnn.readNetFromCaffe: the whole tool depends on it.
        "opencv-python-headless>=4.5.5,<5",
        # the CLI's progress display in a terminal
        "rich>=13",
        # one BLAS thread per layer while layers are analysed side by side (plan/search.py)
        "threadpoolctl>=3.5",  # (3.5: the first that finds numpy 2's scipy-openblas)
    ],
    extras_require={
        # TensorLy is only the tests' independent oracle for CP quality.
        # ONNX output (--format onnx|both): onnx builds and checks the graph, onnxruntime validates it.
        "onnx": ["onnx>=1.16", "onnxruntime>=1.19"],
        "test": ["pytest>=7", "pytest-xdist>=3", "hypothesis>=6", "grpcio-tools>=1.60", "tensorly>=0.8",
                 "onnx>=1.16", "onnxruntime>=1.19"],
        "plot": ["matplotlib>=3.5"],
        "dev": ["pytest>=7", "pytest-xdist>=3", "hypothesis>=6", "matplotlib>=3.5", "grpcio-tools>=1.60", "tensorly>=0.8",
                "onnx>=1.16", "onnxruntime>=1.19"],
    },
    entry_points={"console_scripts": ["caffe-compress=caffe_compress.cli:main"]},
)
