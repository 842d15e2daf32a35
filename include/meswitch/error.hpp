// Error types shared by every part of meswitch.
//
// FormatError means "this file or tensor is not what it claims to be": the
// message always names the file and, when known, the tensor, so a user with a
// broken checkpoint knows where to look without a debugger.
#pragma once

#include <stdexcept>
#include <string>

namespace meswitch {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Malformed or inconsistent input data (file header, tensor shape, dtype...).
class FormatError : public Error {
 public:
  FormatError(const std::string& file, const std::string& tensor, const std::string& problem)
      : Error(compose(file, tensor, problem)), file_(file), tensor_(tensor), problem_(problem) {}

  const std::string& file() const noexcept { return file_; }
  const std::string& tensor() const noexcept { return tensor_; }
  const std::string& problem() const noexcept { return problem_; }

 private:
  static std::string compose(const std::string& file, const std::string& tensor,
                             const std::string& problem) {
    std::string message = file.empty() ? std::string("<memory>") : file;
    if (!tensor.empty()) message += ": tensor '" + tensor + "'";
    return message + ": " + problem;
  }

  std::string file_;
  std::string tensor_;
  std::string problem_;
};

// An operating-system call failed (open, mmap, rename...).
class IoError : public Error {
 public:
  using Error::Error;
};

// An output path meswitch will not write: an existing file or directory that is not
// an earlier output of the same kind, an input of the command, the current directory.
class OutputPathError : public Error {
 public:
  using Error::Error;
};

}  // namespace meswitch
