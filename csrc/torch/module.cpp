// The compiled module dpkd._C: pybind11 bindings of the torch-free core. Argument errors from the
// core (std::invalid_argument) reach Python as ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "accounting/calibration.h"
#include "accounting/conversion.h"
#include "accounting/pld.h"
#include "accounting/rdp.h"

namespace py = pybind11;
namespace acc = dpkd::accounting;

namespace {

acc::Conversion parse_conversion(const std::string& name) {
  if (name == "improved") return acc::Conversion::kImproved;
  if (name == "basic") return acc::Conversion::kBasic;
  throw std::invalid_argument("conversion must be 'improved' or 'basic', got '" + name + "'");
}

std::tuple<double, double> as_tuple(const acc::EpsilonAtOrder& e) { return {e.epsilon, e.order}; }

acc::Adjacency parse_adjacency(const std::string& name) {
  if (name == "remove") return acc::Adjacency::kRemove;
  if (name == "add") return acc::Adjacency::kAdd;
  throw std::invalid_argument("adjacency must be 'remove' or 'add', got '" + name + "'");
}

void bind_accounting(py::module_& m) {
  using Orders = const std::vector<double>&;
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("default_orders", &acc::default_orders);
  m.def("rdp", &acc::rdp, py::arg("sample_rate"), py::arg("noise_multiplier"), py::arg("orders"), nogil);
  m.def(
      "rdp_of_events",
      [](const std::vector<double>& noise_multipliers, const std::vector<double>& sample_rates,
         const std::vector<int64_t>& counts, Orders orders) {
        if (noise_multipliers.size() != sample_rates.size() || sample_rates.size() != counts.size())
          throw std::invalid_argument("events: noise_multipliers, sample_rates and counts differ in length");
        std::vector<acc::GaussianEvent> events;
        for (size_t i = 0; i < counts.size(); ++i) events.push_back({noise_multipliers[i], sample_rates[i], counts[i]});
        return acc::rdp_of_events(events, orders);
      },
      py::arg("noise_multipliers"), py::arg("sample_rates"), py::arg("counts"), py::arg("orders"), nogil);
  m.def(
      "epsilon_from_rdp",
      [](Orders orders, const std::vector<double>& rdp, double delta, const std::string& conversion) {
        return as_tuple(acc::epsilon_from_rdp(orders, rdp, delta, parse_conversion(conversion)));
      },
      py::arg("orders"), py::arg("rdp"), py::arg("delta"), py::arg("conversion"), nogil);
  m.def(
      "epsilon",
      [](double noise_multiplier, double sample_rate, int64_t steps, double delta, Orders orders,
         const std::string& conversion) {
        return as_tuple(acc::epsilon(noise_multiplier, sample_rate, steps, delta, orders, parse_conversion(conversion)));
      },
      py::arg("noise_multiplier"), py::arg("sample_rate"), py::arg("steps"), py::arg("delta"), py::arg("orders"),
      py::arg("conversion"), nogil);
  m.def(
      "calibrate_noise",
      [](double target_epsilon, double delta, double sample_rate, int64_t steps, Orders orders,
         const std::string& conversion) {
        return acc::calibrate_noise(target_epsilon, delta, sample_rate, steps, orders, parse_conversion(conversion));
      },
      py::arg("target_epsilon"), py::arg("delta"), py::arg("sample_rate"), py::arg("steps"), py::arg("orders"),
      py::arg("conversion"), nogil);
  m.def(
      "max_steps",
      [](double target_epsilon, double delta, double noise_multiplier, double sample_rate, Orders orders,
         const std::string& conversion) {
        return acc::max_steps(target_epsilon, delta, noise_multiplier, sample_rate, orders, parse_conversion(conversion));
      },
      py::arg("target_epsilon"), py::arg("delta"), py::arg("noise_multiplier"), py::arg("sample_rate"),
      py::arg("orders"), py::arg("conversion"), nogil);
  m.def(
      "gaussian_hockey_stick",
      [](double noise_multiplier, double sample_rate, double epsilon, const std::string& adjacency) {
        return acc::gaussian_hockey_stick(noise_multiplier, sample_rate, epsilon, parse_adjacency(adjacency));
      },
      py::arg("noise_multiplier"), py::arg("sample_rate"), py::arg("epsilon"), py::arg("adjacency"));
  m.def(
      "subsampled_gaussian_pld",
      [](double noise_multiplier, double sample_rate, double interval, double tail_mass, const std::string& adjacency) {
        const auto dir = parse_adjacency(adjacency);
        acc::DiscretePLD pld;
        {
          py::gil_scoped_release release;
          pld = acc::subsampled_gaussian_pld(noise_multiplier, sample_rate, interval, tail_mass, dir);
        }
        py::array_t<double> masses(static_cast<py::ssize_t>(pld.masses.size()));
        std::copy(pld.masses.begin(), pld.masses.end(), masses.mutable_data());
        return std::make_tuple(pld.lower, masses, pld.infinity_mass);
      },
      py::arg("noise_multiplier"), py::arg("sample_rate"), py::arg("interval"), py::arg("tail_mass"),
      py::arg("adjacency"));
  m.def("gdp_mu", &acc::gdp_mu, py::arg("noise_multiplier"), py::arg("sample_rate"), py::arg("steps"));
  m.def("gdp_epsilon", &acc::gdp_epsilon, py::arg("mu"), py::arg("delta"));
  m.def("gdp_delta", &acc::gdp_delta, py::arg("mu"), py::arg("epsilon"));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dpkd compiled core";
  m.attr("with_cuda") =
#ifdef DPKD_WITH_CUDA
      true;
#else
      false;
#endif
  bind_accounting(m);
}
