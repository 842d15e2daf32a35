// Output directories that never cost the user a file.
//
// `meswitch compress` and `decompress` write whole directories. Two rules keep
// them safe:
//
// 1. Before any work, check_output_directory() refuses a target that is not ours
//    to replace: an existing path that is not a directory of the same kind
//    (recognised by its marker file: manifest.json of an artifact, the
//    meswitch_decompressed.json that decompress writes), the current directory,
//    the root, and any input (the base, the expert, the artifact) or a parent of
//    one. An output of the same kind is replaced only when asked (`replace`).
// 2. The output is built in a staging sibling and commit_directory() moves it in
//    with one rename: renameat2(RENAME_EXCHANGE) swaps a complete new directory
//    with the old one atomically, so a crash at any instant leaves either the old
//    output or the new one at the target, never neither and never a mix. The old
//    one, now under the staging name, is deleted afterwards. A crash can leave a
//    staging directory (`NAME.tmp.PID.XXXXXX`) as litter, never as the output; the
//    next writer of NAME removes those whose process is gone.
//    RENAME_NOREPLACE moves a new output in without replacing anything that
//    appeared meanwhile. Filesystems without renameat2 fall back to two renames,
//    whose gap is the one window in which the target is briefly absent.
//
// Deletion never follows symbolic links: a link inside a replaced output is
// removed, not what it points to.
#pragma once

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "meswitch/error.hpp"

namespace meswitch {

// How a directory says what wrote it: a JSON file whose "format" is `format`.
struct OutputMarker {
  const char* file;
  const char* format;
  const char* description;  // for messages: "a meswitch artifact"
};

inline constexpr OutputMarker kArtifactMarker{"manifest.json", "meswitch-expert", "a meswitch artifact"};
inline constexpr OutputMarker kDecompressedMarker{"meswitch_decompressed.json", "meswitch-decompressed",
                                                  "a model written by meswitch decompress"};

// An input the output must not replace, e.g. {"the base model", "/models/base"}.
struct ProtectedPath {
  std::string role;
  std::string path;
};

namespace detail {

// Fault injection for the crash-safety tests: MESWITCH_CRASH_AT=NAME kills the
// process with SIGKILL at the point NAME, exactly as `kill -9` would.
inline void crash_point(const char* name) {
  const char* wanted = std::getenv("MESWITCH_CRASH_AT");
  if (wanted != nullptr && std::strcmp(wanted, name) == 0) ::raise(SIGKILL);
}

inline void remove_tree(const std::string& path) {
  struct stat info {};
  if (::lstat(path.c_str(), &info) != 0) return;
  if (!S_ISDIR(info.st_mode)) {
    ::unlink(path.c_str());
    return;
  }
  if (DIR* directory = ::opendir(path.c_str())) {
    while (dirent* entry = ::readdir(directory)) {
      const std::string name = entry->d_name;
      if (name == "." || name == "..") continue;
      remove_tree(path + "/" + name);  // lstat inside: links are unlinked, never followed
    }
    ::closedir(directory);
  }
  ::rmdir(path.c_str());
}

// Absolute path with symbolic links resolved as far as the path exists; the rest is
// appended lexically ("." dropped, ".." pops), so a path not yet created compares too.
inline std::string resolved_path(const std::string& path) {
  std::string absolute = path;
  if (absolute.empty() || absolute[0] != '/') {
    char cwd[PATH_MAX];
    if (::getcwd(cwd, sizeof cwd) == nullptr) throw IoError("cannot read the current directory");
    absolute = std::string(cwd) + "/" + absolute;
  }
  std::vector<std::string> parts;
  std::stringstream stream(absolute);
  for (std::string part; std::getline(stream, part, '/');) {
    if (part.empty() || part == ".") continue;
    if (part == "..") {
      if (!parts.empty()) parts.pop_back();
      continue;
    }
    parts.push_back(part);
  }
  // Longest existing prefix through realpath, the remainder as written.
  for (std::size_t keep = parts.size() + 1; keep-- > 0;) {
    std::string prefix;
    for (std::size_t i = 0; i < keep; ++i) prefix += "/" + parts[i];
    if (prefix.empty()) prefix = "/";
    char real[PATH_MAX];
    if (::realpath(prefix.c_str(), real) == nullptr) continue;
    std::string result = real;
    for (std::size_t i = keep; i < parts.size(); ++i) result += (result == "/" ? "" : "/") + parts[i];
    return result;
  }
  return absolute;
}

inline bool is_same_or_inside(const std::string& inner, const std::string& outer) {
  if (inner == outer) return true;
  if (outer == "/") return true;
  return inner.size() > outer.size() && inner.compare(0, outer.size(), outer) == 0 && inner[outer.size()] == '/';
}

// True when `directory` holds a regular marker file whose JSON "format" matches.
inline bool has_marker(const std::string& directory, const OutputMarker& marker) {
  const std::string path = directory + "/" + marker.file;
  struct stat info {};
  if (::lstat(path.c_str(), &info) != 0 || !S_ISREG(info.st_mode)) return false;
  std::ifstream stream(path, std::ios::binary);
  std::stringstream text;
  text << stream.rdbuf();
  const nlohmann::json json = nlohmann::json::parse(text.str(), nullptr, false);
  return json.is_object() && json.contains("format") && json["format"] == marker.format;
}

inline bool is_empty_directory(const std::string& path) {
  DIR* directory = ::opendir(path.c_str());
  if (directory == nullptr) return false;
  bool empty = true;
  while (dirent* entry = ::readdir(directory)) {
    const std::string name = entry->d_name;
    if (name != "." && name != "..") {
      empty = false;
      break;
    }
  }
  ::closedir(directory);
  return empty;
}

inline int rename_with_flags(const std::string& from, const std::string& to, unsigned flags) {
#ifdef SYS_renameat2
  return int(::syscall(SYS_renameat2, AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), flags));
#else
  (void)from, (void)to, (void)flags;
  errno = ENOSYS;
  return -1;
#endif
}

constexpr unsigned kRenameNoReplace = 1u << 0;  // RENAME_NOREPLACE
constexpr unsigned kRenameExchange = 1u << 1;   // RENAME_EXCHANGE

inline void sync_parent(const std::string& path) {
  const std::size_t slash = path.find_last_of('/');
  const std::string parent = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  const int fd = ::open(parent.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

}  // namespace detail

// Refuses `path` as the output of a command writing `marker`'s kind (see the top of
// this file). Throws Error with one sentence naming the path and the reason.
inline void check_output_directory(const std::string& path, const OutputMarker& marker, bool replace,
                                   const std::vector<ProtectedPath>& inputs = {}) {
  if (path.empty()) throw OutputPathError("output path is empty");
  const std::string target = detail::resolved_path(path);
  const std::string quoted = "output '" + path + "'";
  if (target == "/") throw OutputPathError(quoted + " is the root directory");
  if (detail::is_same_or_inside(detail::resolved_path("."), target))
    throw OutputPathError(quoted + " is the current directory or one of its parents; name a new directory");
  for (const ProtectedPath& input : inputs)
    if (!input.path.empty() && detail::is_same_or_inside(detail::resolved_path(input.path), target))
      throw OutputPathError(quoted + " is " + input.role + " '" + input.path + "'" +
                  (detail::resolved_path(input.path) == target ? "" : " or one of its parents") +
                  "; choose another output path");
  struct stat info {};
  if (::lstat(path.c_str(), &info) != 0) {
    if (errno == ENOENT) return;
    throw IoError(quoted + ": cannot inspect it: " + std::strerror(errno));
  }
  if (S_ISLNK(info.st_mode)) throw OutputPathError(quoted + " is a symbolic link; name the directory itself");
  if (!S_ISDIR(info.st_mode)) throw OutputPathError(quoted + " exists and is not a directory; it is left untouched");
  if (detail::is_empty_directory(path)) return;  // nothing to lose
  if (!detail::has_marker(path, marker))
    throw OutputPathError(quoted + " exists and is not " + marker.description + " (no " + marker.file +
                "); it is left untouched, choose another output path");
  if (!replace) throw OutputPathError(quoted + " already holds " + marker.description + "; pass --force (force=True) to replace it");
}

// Creates the staging directory NAME.tmp.PID.XXXXXX beside `target`, first removing
// the ones left by writers of the same target that no longer run.
inline std::string make_staging_directory(const std::string& target) {
  const std::size_t slash = target.find_last_of('/');
  const std::string parent = slash == std::string::npos ? "." : (slash == 0 ? "/" : target.substr(0, slash));
  const std::string prefix = (slash == std::string::npos ? target : target.substr(slash + 1)) + ".tmp.";
  if (DIR* directory = ::opendir(parent.c_str())) {
    std::vector<std::string> stale;
    while (dirent* entry = ::readdir(directory)) {
      const std::string name = entry->d_name;
      if (name.compare(0, prefix.size(), prefix) != 0) continue;
      char* end = nullptr;
      const long pid = std::strtol(name.c_str() + prefix.size(), &end, 10);
      if (pid <= 0 || end == nullptr || *end != '.') continue;  // not one of ours
      if (::kill(pid_t(pid), 0) != 0 && errno == ESRCH) stale.push_back(parent + "/" + name);
    }
    ::closedir(directory);
    for (const std::string& path : stale) detail::remove_tree(path);
  }
  std::string pattern = target + ".tmp." + std::to_string(::getpid()) + ".XXXXXX";
  if (::mkdtemp(&pattern[0]) == nullptr)
    throw IoError("cannot create a staging directory beside '" + target + "': " + std::strerror(errno));
  return pattern;
}

// Moves the complete directory `staging` to `target` in one step (see the top of
// this file); an existing target is replaced and then deleted. `staging` must be a
// sibling of `target` (same filesystem).
inline void commit_directory(const std::string& staging, const std::string& target) {
  struct stat info {};
  const bool exists = ::lstat(target.c_str(), &info) == 0;
  detail::crash_point("before-commit");
  if (exists) {
    if (detail::rename_with_flags(staging, target, detail::kRenameExchange) == 0) {
      detail::sync_parent(target);
      detail::crash_point("after-exchange");
      detail::remove_tree(staging);  // the old output, now under the staging name
      return;
    }
    if (errno != EINVAL && errno != ENOSYS)
      throw IoError("cannot move '" + staging + "' into place at '" + target + "': " + std::strerror(errno));
    // No RENAME_EXCHANGE here: move the old one aside, then the new one in.
    const std::string aside = staging + ".old";
    if (::rename(target.c_str(), aside.c_str()) != 0)
      throw IoError("cannot move the existing '" + target + "' aside: " + std::strerror(errno));
    if (::rename(staging.c_str(), target.c_str()) != 0) {
      const int error = errno;
      ::rename(aside.c_str(), target.c_str());
      throw IoError("cannot move '" + staging + "' into place at '" + target + "': " + std::strerror(error));
    }
    detail::sync_parent(target);
    detail::remove_tree(aside);
    return;
  }
  if (detail::rename_with_flags(staging, target, detail::kRenameNoReplace) == 0) {
    detail::sync_parent(target);
    return;
  }
  if (errno == EEXIST)
    throw OutputPathError("'" + target + "' appeared while the output was being written; it is left untouched");
  if ((errno != EINVAL && errno != ENOSYS) || ::rename(staging.c_str(), target.c_str()) != 0)
    throw IoError("cannot move '" + staging + "' into place at '" + target + "': " + std::strerror(errno));
  detail::sync_parent(target);
}

}  // namespace meswitch
