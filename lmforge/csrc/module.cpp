// The Python module lmforge builds from csrc/ (models/cpu_ext.py): the quantized linear layer
// (quant_linear.cpp) and the fused decode step (decode_layer.cpp).

#include "decode_layer.h"
#include "quant_linear.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quant_linear", &quant_linear, "y = x @ W^T with W in 4-, 5- or 8-bit groups (float32 x, or int8)",
        py::arg("x"), py::arg("codes"), py::arg("scale"), py::arg("zero"), py::arg("high"), py::arg("bits"),
        py::arg("int8_activations") = false);
  m.def("dequantize", &dequantize, "the dense float32 weight of 4-, 5- or 8-bit groups");
  m.def("isa", &isa, "the vector instruction set the kernel was compiled for");
  // module_local: the tests load builds for other -march values beside the native one
  py::class_<lmf::QuantMatrix>(m, "QuantMatrix", "a checked (N, K) weight of 4-, 5- or 8-bit codes",
                               py::module_local())
      .def(py::init<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, int64_t, bool>(),
           py::arg("codes"), py::arg("scale"), py::arg("zero"), py::arg("high"), py::arg("bits"),
           py::arg("int8_activations") = false);
  py::class_<lmf::Decoder>(m, "Decoder", "a Llama-family decoder stack for decode steps",
                           py::module_local())
      .def(py::init<int64_t, int64_t, int64_t, double>(), py::arg("n_heads"),
           py::arg("n_kv_heads"), py::arg("head_dim"), py::arg("rms_norm_eps"))
      .def("add_layer", &lmf::Decoder::add_layer)
      .def("num_layers", &lmf::Decoder::num_layers)
      .def("forward", &lmf::Decoder::forward);
}
