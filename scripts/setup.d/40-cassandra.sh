# Apache Cassandra for the registry's tests and benchmark: the cassandra-all jar and its runtime
# dependencies from Maven Central, run by scripts/cassandra on the machine's Java 17.
# Neither Debian nor PyPI ships a Cassandra server; the Maven artifact is a complete one.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
version=${SALVUS_CASSANDRA_VERSION:-5.0.9}
cache=${SALVUS_CASSANDRA_CACHE:-/var/cache/salvus/cassandra}
apt_install openjdk-17-jre-headless maven
lib="$cache/$version/lib"
if [ -f "$lib/.complete" ]; then
  echo "    cassandra: $version already in $lib"; exit 0
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/salvus-cassandra-fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT
cat > "$work/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.salvus</groupId>
  <artifactId>cassandra-fetch</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.cassandra</groupId>
      <artifactId>cassandra-all</artifactId>
      <version>$version</version>
    </dependency>
  </dependencies>
</project>
EOF
echo "    cassandra: fetching cassandra-all $version and its runtime dependencies"
mvn -B -q -f "$work/pom.xml" dependency:copy-dependencies -DincludeScope=runtime \
  -DoutputDirectory="$work/lib" >"$work/mvn.log" 2>&1 || { tail -20 "$work/mvn.log" >&2; exit 1; }
[ -f "$work/lib/cassandra-all-$version.jar" ] || { echo "setup: cassandra-all-$version.jar missing" >&2; exit 1; }
touch "$work/lib/.complete"
mkdir -p "$cache/$version"
rm -rf "$lib"
# Rename into place so a half-finished fetch is never mistaken for a complete one.
mv "$work/lib" "$lib"
echo "    cassandra: $(ls "$lib" | wc -l) jars in $lib"
